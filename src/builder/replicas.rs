//! One build per image across the replicas that share a store. Before it
//! builds a new image, a replica takes the image's lease
//! (`cache/leases/build/<image key>`, see `leases.rs`) and renews it while
//! it builds; the others wait for the image record instead of building,
//! and take the lease over if it expires because its holder died. A build
//! that fails (a package that does not exist) records nothing, so it ends
//! its lease, deleting it, rather than leave a released one that no image
//! record leads the collector to. A store without conditional creates has
//! no leases, and each replica builds.
//!
//! The build metrics count the builds this replica runs: a replica that
//! waits for another's record counts a lease wait
//! (`nixery_build_lease_waits_total`), not a build started, and the record
//! it gets is neither a build finished nor one failed here.

use std::sync::Arc;
use std::time::Duration;

use super::BuildError;
use super::pipeline::{BuildJob, Built, Pipeline};
use crate::cache::PlanRecord;
use crate::leases::{Lease, Take};

/// How often a waiting replica looks for the record and the lease.
const POLL: Duration = Duration::from_millis(500);

impl Pipeline {
    /// Builds `job`'s image unless another replica is building it, in which
    /// case what it recorded. Images of unpinned revisions, which are not
    /// recorded, are built here.
    pub async fn build_once_everywhere(&self, job: &BuildJob) -> Result<Built, BuildError> {
        let Some(key) = job.cache_key.as_deref() else {
            return self.build_counted(job).await;
        };
        let name = format!("build/{key}");
        let mut waited = false;
        loop {
            if let Some(built) = self.recorded(key).await? {
                return Ok(built);
            }
            match self.leases.take(&name, self.settings.lease_ttl, None).await {
                Ok(Take::Held { lease, took_over }) => {
                    if took_over {
                        self.metrics.lease_takeover();
                        tracing::warn!(image = %job.request, "took over the build of an image whose builder stopped renewing its lease");
                    }
                    return self.build_holding(job, key, *lease).await;
                }
                Ok(Take::Busy(state)) => {
                    if !waited {
                        self.metrics.lease_wait();
                        tracing::info!(image = %job.request, holder = %state.holder, "another replica is building the image: waiting for it");
                        waited = true;
                    }
                    tokio::time::sleep(POLL).await;
                }
                Ok(Take::Unsupported) => return self.build_counted(job).await,
                Err(error) => {
                    tracing::warn!(image = %job.request, %error, "could not take the image's build lease: building without it");
                    return self.build_counted(job).await;
                }
            }
        }
    }

    /// Builds while holding the image's lease, renewing it, then releases
    /// it, or ends it when the build recorded nothing.
    async fn build_holding(&self, job: &BuildJob, key: &str, mut lease: Lease) -> Result<Built, BuildError> {
        // Another replica may have recorded it between the look and the take.
        let result = match self.recorded(key).await {
            Ok(Some(built)) => Ok(built),
            Ok(None) => self.renewing(&mut lease, self.build_counted(job)).await,
            Err(error) => Err(error),
        };
        let given_back = match result {
            Ok(_) => lease.release().await,
            Err(_) => lease.end().await,
        };
        if let Err(error) = given_back {
            tracing::warn!(image = %job.request, %error, "could not release the image's build lease; it expires");
        }
        result
    }

    /// Builds `job`'s image here, counted as a build started and as one
    /// finished or failed.
    async fn build_counted(&self, job: &BuildJob) -> Result<Built, BuildError> {
        self.metrics.build_started();
        let result = self.build(job).await;
        self.metrics.build_ended(result.is_ok());
        result
    }

    /// Runs `work`, renewing `lease` every third of its time to live.
    async fn renewing<T>(&self, lease: &mut Lease, work: impl Future<Output = T>) -> T {
        let every = self.settings.lease_ttl / 3;
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                () = tokio::time::sleep(every) => match lease.renew(None).await {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!("an image's build lease was taken over: another replica builds it too"),
                    Err(error) => tracing::warn!(%error, "could not renew an image's build lease"),
                },
            }
        }
    }

    /// The image recorded under `key`, with its plan, if it is recorded.
    async fn recorded(&self, key: &str) -> Result<Option<Built>, BuildError> {
        let Some(record) = self.caches.image(key).await? else {
            return Ok(None);
        };
        let plan = self.caches.plan(key).await?.unwrap_or(PlanRecord { layers: vec![] });
        Ok(Some(Built {
            record,
            plan: Arc::new(plan),
        }))
    }
}
