//! scim-token-operator: issues and rotates SCIM bearer tokens for `ScimDirectory` resources.
//!
//! `policy` decides, `controller` performs the I/O, `secret` maps tokens to Secrets, `token` and
//! `duration` are the pure building blocks.
// A function longer than a screen is split into named steps (clippy.toml); tests may run longer.
#![warn(clippy::too_many_lines)]
#![cfg_attr(test, allow(clippy::too_many_lines))]
pub mod allocator;
pub mod api;
pub mod cli;
pub mod controller;
pub mod duration;
pub mod entra;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod process;
pub mod secret;
pub mod server;
pub mod status;
pub mod telemetry;
pub mod token;
pub mod verify;

/// The field manager of every write the operator makes (server-side apply, creates, Events).
pub const FIELD_MANAGER: &str = "scim-token-operator";
