//! The work the faults land on: directories created in waves, rotations requested declaratively
//! (`spec.rotationGeneration`) and imperatively (the rotate annotation), some racing the first issue.
//! Every request is retried until the API server takes it (it may be down), and is idempotent (an
//! absolute value), so a retry of a request that did land changes nothing.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::{StreamExt, stream};
use kube::api::{Api, Patch, PatchParams, PostParams};
use scim_token_operator::api::{ROTATE_ANNOTATION, ScimDirectory, ScimDirectorySpec};
use serde_json::json;

use super::observer::{Observed, Record};
use super::schedule::Rng;

/// How long one request is retried while the control plane is down or restarting.
const RETRY_FOR: Duration = Duration::from_secs(300);
const CONCURRENCY: usize = 16;
/// At most this many rotations per directory.
const MAX_ROTATIONS: u32 = 2;

/// What was asked of one directory.
#[derive(Clone, Debug, Default)]
pub(crate) struct Dir {
    pub(crate) created: bool,
    pub(crate) generation: i64,
    pub(crate) request: Option<String>,
    pub(crate) declarative: u32,
    pub(crate) imperative: u32,
    /// Its first rotation was requested right after the create, racing the first issue.
    pub(crate) racing: bool,
}

impl Dir {
    pub(crate) fn rotations(&self) -> u32 {
        self.declarative + self.imperative
    }

    /// The record a token issued for the latest request carries.
    pub(crate) fn record(&self) -> Record {
        (Some(self.generation.to_string()), self.request.clone())
    }
}

pub(crate) fn name(i: usize) -> String {
    format!("tenant-{i:05}")
}

pub(crate) fn secret_name(i: usize) -> String {
    format!("{}-scim-token", name(i))
}

pub(crate) struct Workload {
    api: Api<ScimDirectory>,
    pub(crate) dirs: Mutex<Vec<Dir>>,
    observed: Arc<Mutex<Observed>>,
    seed: u64,
    /// Rotations a wave could not place yet (no directory had its latest token), for the next wave.
    owed: Mutex<usize>,
    requests: Mutex<u64>,
}

impl Workload {
    pub(crate) fn new(client: kube::Client, ns: &str, n: usize, observed: Arc<Mutex<Observed>>, seed: u64) -> Workload {
        Workload {
            api: Api::namespaced(client, ns),
            dirs: Mutex::new(vec![Dir::default(); n]),
            observed,
            seed,
            owed: Mutex::new(0),
            requests: Mutex::new(0),
        }
    }

    /// One wave: create `creates`, the first `racing` of them with a rotation right after the
    /// create, and request `rotations` more on directories whose latest token is already out; the
    /// requests are spread evenly over `window`, so that a fault injected inside it hits work in
    /// flight rather than an idle operator.
    pub(crate) async fn wave(
        self: Arc<Self>,
        index: u64,
        creates: std::ops::Range<usize>,
        racing: usize,
        rotations: usize,
        window: Duration,
    ) -> Result<()> {
        let mut rng = Rng::fork(self.seed, index);
        let targets = self.pick_rotations(rotations, &mut rng);
        let racers = creates.start..creates.start + racing.min(creates.len());
        // (directory, rotation patch, create first)
        let mut work: Vec<(usize, Option<serde_json::Value>, bool)> = Vec::new();
        {
            let mut dirs = self.dirs.lock().expect("poisoned");
            for i in creates {
                let race = racers.contains(&i).then(|| self.plan(&mut dirs, i, rng.chance(50), true));
                work.push((i, race, true));
            }
        }
        work.extend(targets.into_iter().map(|(i, patch)| (i, Some(patch), false)));
        // Interleave creates and rotations over the window.
        for k in (1..work.len()).rev() {
            work.swap(k, rng.below(k as u64 + 1) as usize);
        }
        let step = window / u32::try_from(work.len().max(1)).unwrap_or(u32::MAX);
        let results = futures::future::join_all(work.into_iter().enumerate().map(|(k, (i, rotation, create))| {
            let this = self.clone();
            async move {
                tokio::time::sleep(step * u32::try_from(k).unwrap_or(u32::MAX)).await;
                if create {
                    this.create(i).await?;
                }
                if let Some(patch) = rotation {
                    this.send(i, &patch).await?;
                }
                anyhow::Ok(())
            }
        }))
        .await;
        results.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(())
    }

    /// Picks up to `count` (plus any owed) directories that serve their latest request and may be
    /// rotated again; what cannot be placed is owed to the next wave.
    fn pick_rotations(&self, count: usize, rng: &mut Rng) -> Vec<(usize, serde_json::Value)> {
        let wanted = {
            let mut owed = self.owed.lock().expect("poisoned");
            std::mem::take(&mut *owed) + count
        };
        let picked = {
            let mut dirs = self.dirs.lock().expect("poisoned");
            let mut eligible: Vec<usize> = {
                let observed = self.observed.lock().expect("poisoned");
                (0..dirs.len())
                    .filter(|&i| {
                        let d = &dirs[i];
                        d.created
                            && !d.racing
                            && d.rotations() < MAX_ROTATIONS
                            && observed.serves(&secret_name(i), &d.record())
                    })
                    .collect()
            };
            let mut picked = Vec::new();
            while picked.len() < wanted && !eligible.is_empty() {
                let i = eligible.swap_remove(rng.below(eligible.len() as u64) as usize);
                let declarative = rng.chance(50);
                picked.push((i, self.plan(&mut dirs, i, declarative, false)));
            }
            picked
        };
        *self.owed.lock().expect("poisoned") += wanted - picked.len();
        picked
    }

    /// Places every owed rotation, waiting for directories to serve their latest request (no faults
    /// run any more when this is called). Returns how many were placed.
    pub(crate) async fn settle_owed(self: Arc<Self>, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        let mut placed = 0;
        let mut rng = Rng::fork(self.seed, u64::MAX);
        while self.owed() > 0 {
            if Instant::now() > deadline {
                bail!("{} rotations could not be placed within {timeout:?}", self.owed());
            }
            let targets = self.pick_rotations(0, &mut rng);
            placed += targets.len();
            let results = stream::iter(targets)
                .map(|(i, patch)| {
                    let this = self.clone();
                    async move { this.send(i, &patch).await }
                })
                .buffer_unordered(CONCURRENCY)
                .collect::<Vec<_>>()
                .await;
            results.into_iter().collect::<Result<Vec<_>>>()?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(placed)
    }

    pub(crate) fn owed(&self) -> usize {
        *self.owed.lock().expect("poisoned")
    }

    async fn create(&self, i: usize) -> Result<()> {
        let dir = ScimDirectory::new(
            &name(i),
            ScimDirectorySpec { token_expires_in: Some("90d".into()), ..ScimDirectorySpec::default() },
        );
        retry(&format!("create {}", name(i)), || async {
            match self.api.create(&PostParams::default(), &dir).await {
                // An earlier attempt landed but its answer was lost (the API server was killed).
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                other => other.map(|_| ()),
            }
        })
        .await?;
        self.dirs.lock().expect("poisoned")[i].created = true;
        Ok(())
    }

    /// Records a rotation of directory `i` as asked and returns the patch that asks it. Recorded
    /// when planned, not when sent, so that a directory with a rotation on its way is not picked
    /// again (two requests before the operator acts on the first are served by one token, rightly).
    fn plan(&self, dirs: &mut [Dir], i: usize, declarative: bool, racing: bool) -> serde_json::Value {
        let mut requests = self.requests.lock().expect("poisoned");
        *requests += 1;
        let d = &mut dirs[i];
        d.racing |= racing;
        if declarative {
            d.generation += 1;
            d.declarative += 1;
            json!({ "spec": { "rotationGeneration": d.generation } })
        } else {
            let value = format!("chaos-{}-{}", self.seed, *requests);
            d.request = Some(value.clone());
            d.imperative += 1;
            json!({ "metadata": { "annotations": { ROTATE_ANNOTATION: value } } })
        }
    }

    async fn send(&self, i: usize, patch: &serde_json::Value) -> Result<()> {
        retry(&format!("rotate {}", name(i)), || async {
            self.api.patch(&name(i), &PatchParams::default(), &Patch::Merge(patch)).await.map(|_| ())
        })
        .await
    }
}

async fn retry<F, Fut>(what: &str, mut attempt: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), kube::Error>>,
{
    let deadline = Instant::now() + RETRY_FOR;
    loop {
        match attempt().await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("{what}: still failing after {RETRY_FOR:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}
