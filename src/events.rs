//! Events about directories (`events.k8s.io/v1`), with repeats folded into a series, as kube's
//! `Recorder` does, but remembering only a few words per recent Event.
//!
//! Why not kube's `Recorder`: it keeps every Event it published in the last 6 minutes as a whole
//! object, keyed by the object reference *including its resourceVersion* (so a directory's next Event,
//! after any status write, never finds its series), and sweeps that whole cache under a write lock on
//! every publish. A mass issuance of N directories makes N cached Events and N sweeps of up to N
//! entries. Here a series is keyed by the directory's uid, the type and the reason, remembered as its
//! Event's name, count and last time, and the cache is swept at most once per sweep interval.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::api::ScimDirectory;

/// How long a repeat folds into the previous Event rather than making a new one (kube's value).
const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);
/// How often the remembered series are swept of expired ones.
const SWEEP_INTERVAL: SignedDuration = SignedDuration::from_secs(30);
/// Notes are cut to this many characters (the API server's limit is 1 KiB).
const MAX_NOTE_CHARS: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    uid: String,
    type_: EventType,
    reason: String,
}

#[derive(Debug, Clone)]
struct Series {
    event: String,
    count: i32,
    last: Timestamp,
}

#[derive(Debug)]
struct Recent {
    series: HashMap<SeriesKey, Series>,
    swept_at: Timestamp,
}

pub struct Publisher {
    client: Client,
    controller: String,
    instance: String,
    recent: Mutex<Recent>,
}

impl Publisher {
    pub fn new(client: Client, controller: &str, instance: &str) -> Publisher {
        Publisher {
            client,
            controller: controller.into(),
            instance: instance.into(),
            recent: Mutex::new(Recent { series: HashMap::new(), swept_at: Timestamp::now() }),
        }
    }

    /// Publishes an Event about `dir` in its namespace: a new one, or the next count of the series of
    /// the same type and reason if that one was seen within the series TTL.
    pub async fn publish(&self, dir: &ScimDirectory, type_: EventType, reason: &str, note: &str) -> kube::Result<()> {
        let now = Timestamp::now();
        let key = SeriesKey { uid: dir.uid().unwrap_or_default(), type_, reason: reason.into() };
        let repeat = self.recent_series(&key, now);
        let api: Api<Event> = Api::namespaced(self.client.clone(), &dir.namespace().unwrap_or_default());
        let series = match repeat {
            Some(s) => {
                let count = s.count + 1;
                let patch = json!({ "series": EventSeries { count, last_observed_time: MicroTime(now) } });
                match api.patch(&s.event, &PatchParams::default(), &Patch::Merge(patch)).await {
                    Ok(_) => Series { count, last: now, ..s },
                    // The Event is gone (expired on the API server, or deleted): start a new one.
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        self.create(&api, dir, type_, reason, note, now).await?
                    }
                    Err(e) => return Err(e),
                }
            }
            None => self.create(&api, dir, type_, reason, note, now).await?,
        };
        self.recent.lock().expect("poisoned").series.insert(key, series);
        Ok(())
    }

    /// The remembered series for `key` if it is still open; sweeps expired ones now and then.
    fn recent_series(&self, key: &SeriesKey, now: Timestamp) -> Option<Series> {
        let mut recent = self.recent.lock().expect("poisoned");
        if now.duration_since(recent.swept_at) >= SWEEP_INTERVAL {
            recent.series.retain(|_, s| now.duration_since(s.last) < SERIES_TTL);
            recent.series.shrink_to_fit();
            recent.swept_at = now;
        }
        recent.series.get(key).filter(|s| now.duration_since(s.last) < SERIES_TTL).cloned()
    }

    async fn create(
        &self,
        api: &Api<Event>,
        dir: &ScimDirectory,
        type_: EventType,
        reason: &str,
        note: &str,
        now: Timestamp,
    ) -> kube::Result<Series> {
        let regarding = ObjectReference {
            api_version: Some(ScimDirectory::api_version(&()).into()),
            kind: Some(ScimDirectory::kind(&()).into()),
            namespace: dir.namespace(),
            name: Some(dir.name_any()),
            uid: dir.uid(),
            resource_version: dir.resource_version(),
            ..ObjectReference::default()
        };
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:x}", dir.name_any(), now.as_nanosecond())),
                namespace: dir.namespace(),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(type_.as_str().into()),
            reason: Some(reason.into()),
            action: Some("Reconcile".into()),
            note: Some(note.chars().take(MAX_NOTE_CHARS).collect()),
            regarding: Some(regarding),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        let created = api.create(&PostParams::default(), &event).await?;
        Ok(Series { event: created.name_any(), count: 1, last: now })
    }
}
