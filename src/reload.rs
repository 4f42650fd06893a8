//! Live configuration: SIGHUP and changes of the file on disk re-read it.
//!
//! The whole new file is validated before it replaces the old one behind
//! the `ArcSwap`; a request keeps the snapshot it started with, so a reload
//! never drops one. A file that fails (broken YAML, half-written, deleted,
//! invalid) leaves the last good config serving, is logged, and counts as
//! `tollgate_config_reloads_total{result="error"}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher as _};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::gateway::Gateway;

/// Quiet time after a file event before reloading: editors write in steps.
const SETTLE: Duration = Duration::from_millis(150);

/// Re-reads `path` and swaps it in if valid. Returns whether it was applied.
pub fn reload(gateway: &Gateway, path: &Path) -> bool {
    let _one_at_a_time = gateway.reload_lock.lock();
    let metrics = &gateway.metrics;
    match Config::load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                tracing::warn!(warning = %w, "config warning");
            }
            let old = gateway.config.load();
            if old.listen != loaded.config.listen {
                tracing::warn!("listen addresses changed: they apply only after a restart");
            }
            if old.store_path != loaded.config.store_path {
                tracing::warn!("store.path changed: it applies only after a restart");
            }
            metrics.prepare(&loaded.config);
            gateway.config.store(Arc::new(loaded.config));
            metrics.config_reloads.with_label_values(&["ok"]).inc();
            metrics.config_generation.inc();
            tracing::info!(path = %path.display(), generation = metrics.config_generation.get(), "configuration reloaded");
            true
        }
        Err(errors) => {
            metrics.config_reloads.with_label_values(&["error"]).inc();
            let errors = errors.to_string();
            tracing::error!(path = %path.display(), errors = %errors.trim_end(), "reload failed; the last good configuration keeps serving");
            false
        }
    }
}

/// Watches the config file's directory (so editors that replace the file
/// by renaming are seen too) and reloads after each burst of changes.
pub struct Watcher {
    pub gateway: Arc<Gateway>,
    pub path: PathBuf,
}

#[async_trait]
impl BackgroundService for Watcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (Some(dir), Some(name)) = (self.path.parent(), self.path.file_name()) else {
            return;
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let name = name.to_owned();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                if event
                    .paths
                    .iter()
                    .any(|p| p.file_name() == Some(name.as_os_str()))
                {
                    let _ = tx.send(());
                }
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the config file; SIGHUP still reloads");
                return;
            }
        };
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::error!(error = %e, dir = %dir.display(), "cannot watch the config directory; SIGHUP still reloads");
            return;
        }
        loop {
            tokio::select! {
                event = rx.recv() => if event.is_none() { return },
                _ = shutdown.wait_for(|s| *s) => return,
            }
            // Let the burst settle, then reload once.
            loop {
                tokio::select! {
                    more = tokio::time::timeout(SETTLE, rx.recv()) => match more {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    },
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
            let gateway = self.gateway.clone();
            let path = self.path.clone();
            // Reading and validating is blocking work; keep it off the runtime.
            let _ = tokio::task::spawn_blocking(move || reload(&gateway, &path)).await;
        }
    }
}
