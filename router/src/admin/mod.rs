//! What the admin listener shows and changes: the API and `/metrics`, the
//! destinations, dead letters, the overview and the history (the console
//! in [`crate::console`] shows them too).
//!
//! # Layout
//! Modules import only modules listed above them (a test checks it):
//! - [`overview`]: measures every destination (lag, pending, dead letters, owners) and applies pauses.
//! - [`history`]: the delivery history by minute in Redis, added to by every router.
//! - [`event_log`]: an event's attempts at each destination, and a user's events, read from the delivery log.
//! - [`dead_letters`]: listing, replaying and deleting dead letters.
//! - [`destinations`]: the admin API's destination bodies (create, merge-patch, masked read).
//! - [`routes`]: the routes, their authentication and errors, and the OpenAPI document.

pub(crate) mod dead_letters;
pub(crate) mod destinations;
pub(crate) mod event_log;
pub(crate) mod history;
pub(crate) mod overview;
pub(crate) mod routes;
