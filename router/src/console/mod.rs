//! The console: server-rendered pages, with forms and inline SVG charts and
//! no scripts, served by the admin listener behind the admin token. Every
//! change goes through the same operations as the admin API, so a form
//! gets the API's own validation messages.
//!
//! # Layout
//! Modules import only modules listed above them (a test checks it):
//! - [`html`]: escaping, the page frame and style, and small pieces (badges, times, numbers).
//! - [`csrf`]: the token every form carries (a double-submit cookie).
//! - [`charts`]: a series over time as an inline SVG chart.
//! - [`health`]: what state a destination is in, from its measurement and recent history.
//! - [`forms`]: the destination form: its fields to the API's JSON, and the API's refusal back to a field.
//! - [`overview_page`]: every destination at a glance.
//! - [`destination_page`]: one destination: settings, pause, charts, attempts, dead letters.
//! - [`event_page`]: an event's or a user's attempts at every destination.
//! - [`routes`]: the pages' routes and the forms' actions.

pub(crate) mod charts;
pub(crate) mod csrf;
pub(crate) mod destination_page;
pub(crate) mod event_page;
pub(crate) mod forms;
pub(crate) mod health;
pub(crate) mod html;
pub(crate) mod overview_page;
pub(crate) mod routes;
