//! The verifier as both protocols see it: one `check` of a request's credentials against the index,
//! counted, and what a refusal tells the client. The HTTP (`http.rs`) and gRPC (`grpc.rs`) adapters
//! only translate their protocol to and from it.

use std::sync::{Arc, RwLock};

use k8s_openapi::jiff::Timestamp;

use super::index::{Denial, DirectoryId, Index, MalformedBinding, Verdict};
use super::metrics::VerifierMetrics;

/// Response headers naming the directory of an accepted token.
pub const NAMESPACE_HEADER: &str = "x-scim-directory-namespace";
pub const NAME_HEADER: &str = "x-scim-directory-name";
/// Request header (set per route by the proxy) naming the directory the route belongs to.
pub const EXPECTED_HEADER: &str = "x-scim-expected-directory";
/// The same as a query parameter of the auth request.
pub const EXPECTED_PARAM: &str = "directory";

#[derive(Clone)]
pub struct Verifier {
    pub index: Arc<RwLock<Index>>,
    pub metrics: Arc<VerifierMetrics>,
}

impl Verifier {
    /// Decides one request and counts it: the one entry point of every protocol adapter. A route
    /// bound to a malformed directory name (`expected` is `Err`) is the proxy's mistake: refused,
    /// never opened.
    pub fn check(
        &self,
        authorization: Option<&[u8]>,
        expected: Result<Option<DirectoryId>, MalformedBinding>,
    ) -> Verdict {
        let verdict = match expected {
            Ok(expected) => {
                self.index.read().expect("poisoned").verify(authorization, expected.as_ref(), Timestamp::now())
            }
            Err(MalformedBinding) => Verdict::Denied(Denial::Malformed),
        };
        match &verdict {
            Verdict::Allowed { directory, kind } => self.metrics.allowed(directory, *kind),
            Verdict::Denied(denial) => self.metrics.result(denial.as_str()),
            Verdict::WrongDirectory { .. } => self.metrics.result("wrong_directory"),
        }
        verdict
    }
}

/// The RFC 6750 challenge of a refusal (`WWW-Authenticate`); `None` for an allowed request.
pub fn challenge(verdict: &Verdict) -> Option<String> {
    let description = match verdict {
        Verdict::Allowed { .. } => return None,
        // §3.1: a request without credentials gets a challenge without an error code.
        Verdict::Denied(Denial::Missing) => return Some(r#"Bearer realm="scim""#.to_owned()),
        Verdict::WrongDirectory { .. } => {
            return Some(
                r#"Bearer realm="scim", error="insufficient_scope", error_description="the token belongs to another directory""#
                    .to_owned(),
            );
        }
        Verdict::Denied(Denial::Malformed) => "not a SCIM bearer token",
        Verdict::Denied(Denial::Unknown) => "the token is not valid",
        Verdict::Denied(Denial::Expired) => "the token has expired",
    };
    Some(format!(r#"Bearer realm="scim", error="invalid_token", error_description="{description}""#))
}
