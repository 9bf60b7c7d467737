//! Tenants: one container per API key (and per `session` a request names within its key), so no
//! caller can see, signal or write another's processes or files.
//!
//! Every tenant container comes from the same keyed image and profile as the one `sandbox up`
//! started (same pinned host key), has no network, and keeps its /workspace in a tmpfs of
//! `--sandbox-disk` bytes: filling it is ENOSPC inside the container, never the host's disk. A
//! tenant is created on first use, paused (`docker pause`: no CPU, memory kept) after
//! `--sandbox-idle-stop`, removed after `--sandbox-idle-remove`. Each belongs to its key (recorded
//! as a container label, so a restarted server knows it too); a key holds at most
//! `--sandbox-max-sessions` tenants (or its keys-file `sandbox_sessions`) and the server at most
//! `--sandbox-max-tenants`. A new tenant over either cap first evicts its own key's longest-idle
//! paused tenant (or one no key owns, left by an older version), never another key's: that would
//! destroy another key's workspace. When none is evictable the command is refused as busy (never
//! an unbounded wait).
//!
//! Must not: let two tenants share a container, or wait without a deadline.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

use super::container::{self, SandboxState};
use super::image::{hex, Docker};
use super::ssh::{SshConfig, SshExecutor, Transport};
use super::{Caller, ExecFuture, ExecOutput, ExecRequest, Executor, SandboxError, StartHook};

/// How tenants are made and bounded.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub docker: Docker,
    /// The sandbox `up` started: image, keys, profile, labels.
    pub state: SandboxState,
    /// The SSH settings every tenant's executor starts from (its transport is replaced).
    pub ssh: SshConfig,
    /// Size of each tenant's /workspace tmpfs.
    pub disk_bytes: u64,
    pub max_tenants: usize,
    /// Tenants one key may hold when its caller names no cap of its own.
    pub max_sessions: usize,
    /// Idle time after which a tenant is paused.
    pub idle_stop: Duration,
    /// Idle time after which a tenant (and its workspace) is removed.
    pub idle_remove: Duration,
    /// Where the tenant table is written for `sandbox status` (`tenants.json`).
    pub record: PathBuf,
}

struct Tenant {
    executor: Arc<SshExecutor>,
    /// The key id it belongs to; `None` for a container an older version left unlabelled.
    owner: Option<String>,
    created: SystemTime,
    last_used: Instant,
    /// Commands running now: an active tenant is never paused or removed.
    active: usize,
    paused: bool,
}

/// One line of `tenants.json`.
#[derive(Debug, Serialize)]
struct TenantRecord<'a> {
    container: &'a str,
    created_unix: u64,
    idle_s: u64,
    active: usize,
    paused: bool,
}

/// The tenant pool; an [`Executor`] that runs each command in its caller's own container.
pub struct Tenants {
    config: TenantConfig,
    /// `--sandbox-concurrency` over all tenants.
    slots: Semaphore,
    // A tokio mutex: held across the `docker run` that creates a tenant, so the first two
    // commands of one tenant cannot start two containers.
    table: tokio::sync::Mutex<HashMap<String, Tenant>>,
}

/// The container name of tenant `key` of sandbox `sandbox`: a hash, so key ids and session names
/// never reach Docker's namespace.
pub fn container_name(sandbox: &str, key: &str) -> String {
    format!(
        "{sandbox}-t-{}",
        &hex(&Sha256::digest(key.as_bytes()))[..12]
    )
}

/// An executor reaching tenant container `container` with the pool's SSH settings.
fn executor_for(config: &TenantConfig, container: &str) -> SshExecutor {
    let mut ssh = config.ssh.clone();
    ssh.transport = Transport::DockerExec {
        docker: config.docker.program.clone(),
        container: container.to_owned(),
    };
    SshExecutor::new(ssh)
}

impl Tenants {
    /// The pool, adopting the tenant containers an earlier server left (they count against the
    /// cap and are reaped like new ones, idle from now).
    pub fn new(config: TenantConfig) -> Arc<Self> {
        let slots = Semaphore::new(config.ssh.max_concurrent.max(1));
        let mut table = HashMap::new();
        match container::tenants(&config.docker, &config.state.name) {
            Ok(existing) => {
                for found in existing {
                    let paused = found.status != "running";
                    table.insert(
                        found.name.clone(),
                        Tenant {
                            executor: Arc::new(executor_for(&config, &found.name)),
                            owner: Some(found.owner.clone()).filter(|o| !o.is_empty()),
                            created: SystemTime::now(),
                            last_used: Instant::now(),
                            active: 0,
                            // Stopped or paused: the next command starts or unpauses it.
                            paused,
                        },
                    );
                }
                if !table.is_empty() {
                    tracing::info!(
                        tenants = table.len(),
                        "adopted the tenant containers of an earlier run"
                    );
                }
            }
            Err(e) => tracing::warn!(%e, "cannot list existing tenant containers"),
        }
        let tenants = Arc::new(Self {
            config,
            slots,
            table: tokio::sync::Mutex::new(table),
        });
        // The reaper holds a weak reference: it ends when the pool is dropped.
        let weak = Arc::downgrade(&tenants);
        let every = (tenants.config.idle_stop / 4)
            .clamp(Duration::from_millis(200), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(tenants) = weak.upgrade() else {
                    return;
                };
                tenants.reap().await;
            }
        });
        tenants
    }

    fn executor_for(&self, container: &str) -> SshExecutor {
        executor_for(&self.config, container)
    }

    async fn docker<T: Send + 'static>(
        &self,
        f: impl FnOnce(Docker, SandboxState) -> Result<T, container::ContainerError> + Send + 'static,
    ) -> Result<T, SandboxError> {
        let docker = self.config.docker.clone();
        let state = self.config.state.clone();
        tokio::task::spawn_blocking(move || f(docker, state))
            .await
            .map_err(|e| SandboxError::Unavailable(format!("docker task: {e}")))?
            .map_err(|e| SandboxError::Unavailable(e.to_string()))
    }

    /// Removes the longest-idle paused tenant that `may_evict` allows; whether one was.
    async fn evict(
        &self,
        table: &mut HashMap<String, Tenant>,
        may_evict: impl Fn(&Tenant) -> bool,
    ) -> Result<bool, SandboxError> {
        let evictable = table
            .iter()
            .filter(|(_, t)| t.active == 0 && t.paused && may_evict(t))
            .min_by_key(|(_, t)| t.last_used)
            .map(|(n, _)| n.clone());
        let Some(evict) = evictable else {
            return Ok(false);
        };
        tracing::info!(tenant = %evict, "removing the longest-idle tenant to make room");
        table.remove(&evict);
        let gone = evict.clone();
        self.docker(move |docker, _| container::remove_tenant(&docker, &gone))
            .await?;
        Ok(true)
    }

    /// The executor of `caller`'s tenant, creating or waking its container; marks it active.
    async fn checkout(&self, caller: &Caller) -> Result<(String, Arc<SshExecutor>), SandboxError> {
        let name = container_name(&self.config.state.name, &caller.tenant());
        let owner = caller.owner().to_owned();
        let mut table = self.table.lock().await;
        if !table.contains_key(&name) {
            let cap = caller.max_sessions.unwrap_or(self.config.max_sessions);
            let held = table
                .values()
                .filter(|t| t.owner.as_deref() == Some(&owner))
                .count();
            let own = |t: &Tenant| t.owner.as_deref() == Some(&owner);
            if held >= cap {
                if !self.evict(&mut table, own).await? {
                    return Err(SandboxError::Busy(format!(
                        "this key holds {held} sandbox sessions, its cap \
                         (--sandbox-max-sessions), and all are in use"
                    )));
                }
            } else if table.len() >= self.config.max_tenants
                && !self
                    .evict(&mut table, |t| own(t) || t.owner.is_none())
                    .await?
            {
                return Err(SandboxError::Busy(format!(
                    "all {} tenant containers are in use or belong to other keys \
                     (--sandbox-max-tenants)",
                    self.config.max_tenants
                )));
            }
        }
        let disk = self.config.disk_bytes;
        let wake = match table.get(&name) {
            None => true,
            Some(t) => t.paused,
        };
        if wake {
            let (tenant, owner) = (name.clone(), owner.clone());
            self.docker(move |docker, state| {
                container::start_tenant(&docker, &state, &tenant, &owner, disk)
            })
            .await?;
        }
        let executor = self.executor_for(&name);
        let entry = table.entry(name.clone()).or_insert_with(|| Tenant {
            executor: Arc::new(executor),
            owner: Some(owner),
            created: SystemTime::now(),
            last_used: Instant::now(),
            active: 0,
            paused: false,
        });
        entry.active += 1;
        entry.paused = false;
        entry.last_used = Instant::now();
        let executor = Arc::clone(&entry.executor);
        self.write_record(&table);
        Ok((name, executor))
    }

    async fn checkin(&self, name: &str) {
        let mut table = self.table.lock().await;
        if let Some(t) = table.get_mut(name) {
            t.active = t.active.saturating_sub(1);
            t.last_used = Instant::now();
        }
        self.write_record(&table);
    }

    /// Pauses tenants idle past `idle_stop` and removes those idle past `idle_remove`.
    async fn reap(&self) {
        let mut table = self.table.lock().await;
        let mut changed = false;
        let names: Vec<String> = table.keys().cloned().collect();
        for name in names {
            let Some(t) = table.get(&name) else { continue };
            if t.active > 0 {
                continue;
            }
            let idle = t.last_used.elapsed();
            if idle >= self.config.idle_remove {
                let gone = name.clone();
                match self
                    .docker(move |docker, _| container::remove_tenant(&docker, &gone))
                    .await
                {
                    Ok(()) => {
                        tracing::info!(tenant = %name, idle_s = idle.as_secs(), "removed an idle tenant");
                        table.remove(&name);
                        changed = true;
                    }
                    Err(e) => tracing::warn!(tenant = %name, %e, "cannot remove an idle tenant"),
                }
            } else if idle >= self.config.idle_stop && !t.paused {
                let target = name.clone();
                let paused = self
                    .docker(move |docker, _| {
                        docker
                            .output(&["pause", &target])
                            .map(|_| ())
                            .map_err(Into::into)
                    })
                    .await;
                match paused {
                    Ok(()) => {
                        if let Some(t) = table.get_mut(&name) {
                            t.paused = true;
                        }
                        changed = true;
                    }
                    Err(e) => tracing::warn!(tenant = %name, %e, "cannot pause an idle tenant"),
                }
            }
        }
        if changed {
            self.write_record(&table);
        }
    }

    fn write_record(&self, table: &HashMap<String, Tenant>) {
        let records: Vec<TenantRecord> = table
            .iter()
            .map(|(name, t)| TenantRecord {
                container: name,
                created_unix: t
                    .created
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                idle_s: t.last_used.elapsed().as_secs(),
                active: t.active,
                paused: t.paused,
            })
            .collect();
        let text = serde_json::to_string_pretty(&records).unwrap_or_default();
        // Best effort: the table is for `sandbox status`, not for correctness.
        let _ = std::fs::write(&self.config.record, text);
    }

    async fn run(
        &self,
        caller: &Caller,
        request: ExecRequest,
        start: StartHook,
    ) -> Result<ExecOutput, SandboxError> {
        let _slot = super::ssh::acquire_slot(&self.slots, &self.config.ssh).await?;
        let (name, executor) = self.checkout(caller).await?;
        let result = match start().await {
            Ok(()) => executor.run(request).await,
            Err(e) => Err(e),
        };
        self.checkin(&name).await;
        result
    }
}

impl Executor for Tenants {
    fn exec(&self, caller: &Caller, request: ExecRequest, start: StartHook) -> ExecFuture<'_> {
        let caller = caller.clone();
        Box::pin(async move { self.run(&caller, request, start).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_are_hashes_and_differ_per_key() {
        let a = container_name("lm-sandbox", "key-aaaa/");
        let b = container_name("lm-sandbox", "key-bbbb/");
        let c = container_name("lm-sandbox", "key-aaaa/session");
        assert!(a.starts_with("lm-sandbox-t-") && a.len() == "lm-sandbox-t-".len() + 12);
        assert!(a != b && a != c && b != c);
        assert_eq!(a, container_name("lm-sandbox", "key-aaaa/"));
    }
}
