//! scim-token-operator: issues and rotates SCIM bearer tokens for `ScimDirectory` resources.
pub mod duration;
pub mod token;
