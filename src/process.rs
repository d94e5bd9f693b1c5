//! The process plumbing both programs (the operator and the verifier) and `kubectl scim` share:
//! the API client, the stop signal, core dumps, namespace scopes. Kept out of the command line so that
//! neither program reaches into the other's module for it.

use kube::client::ClientBuilder;
use tracing::warn;

use crate::leader::Fence;

/// A namespace name as Kubernetes accepts it (an RFC 1123 label), so a typo in `--namespace` fails at
/// start-up with a message instead of as a stream of 404s.
/// An empty entry is ignored, so `WATCH_NAMESPACE=""` means all namespaces, as operators usually read it.
pub fn namespace_name(value: &str) -> Result<String, String> {
    let valid = value.is_empty()
        || (value.len() <= 63
            && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !value.starts_with('-')
            && !value.ends_with('-'));
    if valid {
        Ok(value.to_string())
    } else {
        Err(format!(
            "{value:?} is not a namespace name (lowercase letters, digits and '-', at most 63, starting and ending alphanumeric)"
        ))
    }
}

pub fn dedup(namespaces: &[String]) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    namespaces.iter().filter(|n| !n.is_empty() && seen.insert(n.as_str())).cloned().collect()
}

/// A client from the kubeconfig or the in-cluster config, with at most `max_inflight` requests at once.
pub async fn client(max_inflight: usize) -> anyhow::Result<kube::Client> {
    fenced_client(max_inflight, &Fence::open()).await
}

/// As [`client`], and refusing every write once `fence` is closed, checked after the write holds its
/// permit: one that waited for a permit past the renew deadline is not sent.
pub async fn fenced_client(max_inflight: usize, fence: &Fence) -> anyhow::Result<kube::Client> {
    let config = kube::Config::infer().await?;
    Ok(ClientBuilder::try_from(config)
        .map_err(explain_client_error)?
        .with_layer(&crate::leader::limited(max_inflight, fence.clone()))
        .build())
}

/// Turns the TLS library's terse refusal of an X.509 v1 client certificate (which kubectl accepts)
/// into what is wrong and how to fix it.
fn explain_client_error(error: kube::Error) -> anyhow::Error {
    if error.to_string().contains("UnsupportedCertVersion") {
        anyhow::anyhow!(
            "the kubeconfig's client certificate is X.509 version 1 (what `openssl x509 -req` makes without \
             extensions), which this operator's TLS library refuses; issue it as version 3, e.g. \
             `openssl x509 -req ... -extfile <(printf 'extendedKeyUsage=clientAuth')`, or use a \
             ServiceAccount token ({error})"
        )
    } else {
        error.into()
    }
}

/// The process holds plaintext tokens while it writes them: no core dump may carry them to disk, and
/// no other process of the same user may attach to it or read its memory (non-dumpable).
#[allow(unsafe_code)] // setrlimit, prctl: see the SAFETY note
pub fn disable_core_dumps() {
    let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain system calls with valid arguments; they touch no memory of ours but `no_core`.
    let (limited, undumpable) =
        unsafe { (libc::setrlimit(libc::RLIMIT_CORE, &no_core), libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0)) };
    if limited != 0 || undumpable != 0 {
        warn!(error = %std::io::Error::last_os_error(), "could not disable core dumps");
    }
}

pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
