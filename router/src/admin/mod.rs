//! The admin listener: the API, the status page and `/metrics`, and what
//! they show and change (destinations, dead letters, the overview).
//!
//! # Layout
//! Modules import only modules listed above them (a test checks it):
//! - [`overview`]: measures every destination (lag, pending, dead letters, owners) and applies pauses.
//! - [`event_log`]: an event's attempts at each destination, and a user's events, read from the delivery log.
//! - [`dead_letters`]: listing, replaying and deleting dead letters.
//! - [`destinations`]: the admin API's destination bodies (create, merge-patch, masked read).
//! - [`status_page`]: the server-rendered status page.
//! - [`routes`]: the routes, their authentication and errors, and the OpenAPI document.

pub(crate) mod dead_letters;
pub(crate) mod destinations;
pub(crate) mod event_log;
pub(crate) mod overview;
pub(crate) mod routes;
pub(crate) mod status_page;
