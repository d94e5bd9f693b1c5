//! The watch streams of one scope: Secrets (only ours, cached as [`SecretView`]s) and directories
//! (cached without what decisions never read), and what of their changes triggers a reconcile.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{Stream, StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use prometheus_client::metrics::gauge::Gauge;
use tracing::warn;

use super::Context;
use crate::api::{END_OVERLAP_ANNOTATION, ROTATE_ANNOTATION, ScimDirectory};
use crate::secret::{self, ObservedSecret, SecretCache};

/// The Secret watch. Only Secrets carrying our label are watched, never every Secret of the cluster;
/// of those, only the ones a directory controls are cached, and only as what decisions read (a
/// `SecretView`): anyone can put the label on a Secret of their own, of any size. Every event goes
/// into `cache`; the echoes of our own writes go no further.
pub(super) fn secret_changes(
    api: Api<ObservedSecret>,
    cache: SecretCache,
    cached: Gauge,
    lists: Arc<InitialLists>,
) -> impl Stream<Item = Result<ObservedSecret, watcher::Error>> + Send + 'static {
    watcher(api, watcher::Config::default().labels(secret::MANAGED_SELECTOR).any_semantic())
        .default_backoff()
        .filter_map(|event| std::future::ready(only_directory_secrets(event)))
        .try_filter_map(move |mut event| {
            let trigger = cache.apply(&mut event);
            cached.set(i64::try_from(cache.len()).unwrap_or(i64::MAX));
            if matches!(event, watcher::Event::InitDone) {
                lists.secrets_listed();
            }
            std::future::ready(Ok(trigger.then_some(event)))
        })
        .touched_objects()
        .predicate_filter(predicates::resource_version, Default::default())
}

/// The directory watch, reflected into `ctx.directories`, as the reconcile requests it triggers (see
/// [`directory_trigger`]).
pub(super) fn directory_triggers(
    api: Api<ScimDirectory>,
    writer: reflector::store::Writer<ScimDirectory>,
    ctx: Arc<Context>,
    lists: Arc<InitialLists>,
) -> impl Stream<Item = ObjectRef<ScimDirectory>> + Send + 'static {
    watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(strip_directory_noise)
        .reflect(writer)
        // A deleted directory gets no reconcile to clean up after it: drop its expiry series and
        // backoff state here, so neither outlives it.
        .inspect_ok(move |event| match event {
            watcher::Event::Delete(dir) => ctx.forget(&ObjectRef::from(dir)),
            watcher::Event::InitDone => {
                ctx.prune(&ctx.directories);
                lists.directories_listed();
            }
            _ => {}
        })
        .applied_objects()
        .predicate_filter(directory_trigger, Default::default())
        // A reconcile request needs the directory's name and namespace only. Made from the object, as
        // `for_stream` makes it, it would also copy the UID and resourceVersion: two more strings per
        // directory in each of the scheduler's two indexes, where every directory waits for its renewal.
        .filter_map(|triggered| {
            std::future::ready(match triggered {
                Ok(dir) => Some(ObjectRef::new(&dir.name_any()).within(&dir.namespace().unwrap_or_default())),
                Err(error) => {
                    warn!(%error, "watching ScimDirectories failed; retrying with backoff");
                    None
                }
            })
        })
}

/// What re-triggers a directory: spec changes (generation) and rotation requests (an annotation, which
/// does not bump the generation). Status writes, including our own, change neither.
fn directory_trigger(dir: &ScimDirectory) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.metadata.generation.hash(&mut h);
    dir.rotation_request().hash(&mut h);
    dir.end_overlap_request().hash(&mut h);
    Some(h.finish())
}

/// The first complete list of each cache of a scope, seen on the watch streams (`InitDone`, after the
/// reflector has stored the list): reconciles wait for the Secret cache, readiness for both. Not
/// `Store::wait_until_ready`: with several waiters on one store (the controller runtime is one), only
/// one wakes, which would leave a new leader not ready for good.
pub(super) struct InitialLists {
    secrets: AtomicBool,
    directories: AtomicBool,
    secrets_synced: tokio::sync::watch::Sender<bool>,
    on_synced: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl InitialLists {
    pub(super) fn new(
        secrets_synced: tokio::sync::watch::Sender<bool>,
        on_synced: impl FnOnce() + Send + 'static,
    ) -> Self {
        InitialLists {
            secrets: AtomicBool::new(false),
            directories: AtomicBool::new(false),
            secrets_synced,
            on_synced: Mutex::new(Some(Box::new(on_synced))),
        }
    }

    fn secrets_listed(&self) {
        self.secrets.store(true, Ordering::SeqCst);
        self.secrets_synced.send_replace(true);
        self.both_listed();
    }

    fn directories_listed(&self) {
        self.directories.store(true, Ordering::SeqCst);
        self.both_listed();
    }

    fn both_listed(&self) {
        if self.secrets.load(Ordering::SeqCst) && self.directories.load(Ordering::SeqCst) {
            let on_synced = self.on_synced.lock().expect("poisoned").take();
            if let Some(on_synced) = on_synced {
                on_synced();
            }
        }
    }
}

/// Keeps Secrets without a directory's controller reference out of the cache: one seen before is
/// evicted (as if deleted), one seen in a fresh list is skipped.
fn only_directory_secrets(
    event: Result<watcher::Event<ObservedSecret>, watcher::Error>,
) -> Option<Result<watcher::Event<ObservedSecret>, watcher::Error>> {
    use watcher::Event::{Apply, Delete, InitApply};
    match event {
        Ok(Apply(s)) if !secret::is_directory_controlled(&s.metadata) => Some(Ok(Delete(s))),
        Ok(InitApply(s)) if !secret::is_directory_controlled(&s.metadata) => None,
        other => Some(other),
    }
}

/// The cache keeps what decisions read. Of the metadata maps that is two annotations: managedFields,
/// labels and other tools' annotations (kubectl's last-applied copy of the whole object, Argo CD's
/// tracking id) are never read, and at 10,000 directories their maps would be a good part of the
/// memory (a B-tree node is ~540 bytes however few entries it holds).
fn strip_directory_noise(d: &mut ScimDirectory) {
    d.metadata.managed_fields = None;
    d.metadata.labels = None;
    if let Some(annotations) = d.metadata.annotations.as_mut() {
        annotations.retain(|key, _| key == ROTATE_ANNOTATION || key == END_OVERLAP_ANNOTATION);
        if annotations.is_empty() {
            d.metadata.annotations = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ScimDirectorySpec;
    use std::collections::BTreeMap;

    #[test]
    fn cached_directories_keep_the_annotations_decisions_read_and_nothing_else() {
        let mut dir = ScimDirectory::new("acme", ScimDirectorySpec::default());
        dir.metadata.labels = Some(BTreeMap::from([("app.kubernetes.io/instance".into(), "tenants".into())]));
        dir.metadata.annotations = Some(BTreeMap::from([
            (ROTATE_ANNOTATION.into(), "r-1".into()),
            (END_OVERLAP_ANNOTATION.into(), "e-1".into()),
            ("argocd.argoproj.io/tracking-id".into(), "tenants:scim.tokenops.dev/ScimDirectory:x/acme".into()),
            ("kubectl.kubernetes.io/last-applied-configuration".into(), "{}".into()),
        ]));
        let trigger = directory_trigger(&dir);
        strip_directory_noise(&mut dir);
        assert_eq!((dir.rotation_request(), dir.end_overlap_request()), (Some("r-1"), Some("e-1")));
        assert_eq!(dir.metadata.annotations.as_ref().map(BTreeMap::len), Some(2));
        assert_eq!(dir.metadata.labels, None);
        assert_eq!(directory_trigger(&dir), trigger, "what triggers a reconcile is kept");

        dir.metadata.annotations = Some(BTreeMap::from([("other".into(), "x".into())]));
        strip_directory_noise(&mut dir);
        assert_eq!(dir.metadata.annotations, None);
    }
}
