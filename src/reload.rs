//! Live configuration: SIGHUP and changes of the file on disk re-read it.
//!
//! The whole new file is validated before it replaces the old one behind
//! the `ArcSwap`; a request keeps the snapshot it started with, so a reload
//! never drops one. A file that fails (broken YAML, half-written, deleted,
//! invalid) leaves the last good config serving, is logged, and counts as
//! `tollgate_config_reloads_total{result="error"}`.
//!
//! Every SIGHUP reloads, changed file or not. The watcher reloads only
//! after an event that can change the file's bytes (not an open, a read or
//! a chmod: the reload itself opens and reads the file, so reacting to those
//! would reload forever), and only if the bytes differ from what the last
//! reload, the watcher's or SIGHUP's, read: one reload, or one logged
//! failure, per change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher as _};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::config::{Config, ConfigError, ConfigErrors, Loaded};
use crate::gateway::Gateway;

/// Quiet time after a file event before reloading: editors write in steps.
const SETTLE: Duration = Duration::from_millis(150);

/// The SHA-256 of the bytes a reload read.
type Hash = [u8; 32];

/// Whether an event of this kind can have changed a file's bytes. A backend
/// that cannot tell (`Any`, `Modify(Any)`) is taken to mean yes, and some
/// events that say yes change nothing (inotify reports setting only the
/// mtime as a data change): the hash check then stops the reload.
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_)) | EventKind::Other => {
            false
        }
        EventKind::Any | EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
    }
}

/// Re-reads `path` and swaps it in if valid, changed or not: SIGHUP's
/// reload. Returns whether it was applied.
pub fn reload(gateway: &Gateway, path: &Path) -> bool {
    let mut last = gateway.last_reload.lock();
    let read = std::fs::read(path);
    *last = read.as_ref().ok().map(|bytes| hash(bytes));
    apply(gateway, path, read)
}

/// The watcher's reload: like [`reload`], but nothing happens if the file
/// holds the bytes the last reload read. `None` when skipped.
fn reload_if_changed(gateway: &Gateway, path: &Path) -> Option<bool> {
    let mut last = gateway.last_reload.lock();
    let read = std::fs::read(path);
    let now = read.as_ref().ok().map(|bytes| hash(bytes));
    // An unreadable file always counts as a change, so a deletion is
    // reported once per event burst.
    let unchanged = now.is_some() && *last == now;
    *last = now;
    if unchanged {
        tracing::debug!(path = %path.display(), "config file unchanged; not reloaded");
        return None;
    }
    Some(apply(gateway, path, read))
}

fn hash(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

/// Validates what a reload read and swaps it in if valid; the caller holds
/// the reload lock.
fn apply(gateway: &Gateway, path: &Path, read: std::io::Result<Vec<u8>>) -> bool {
    let metrics = &gateway.metrics;
    match parse(path, read) {
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
            if old.redis != loaded.config.redis {
                tracing::warn!("store.redis changed: it applies only after a restart");
            }
            // Counted first: whoever sees the new config sees its generation.
            metrics.config_reloads.with_label_values(&["ok"]).inc();
            metrics.config_generation.inc();
            gateway.install(loaded.config);
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

/// [`Config::load`] on bytes already read, so that what is validated is
/// exactly what was hashed.
fn parse(path: &Path, read: std::io::Result<Vec<u8>>) -> Result<Loaded, ConfigErrors> {
    let cannot_read = |e: &dyn std::fmt::Display| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            line: None,
            message: format!("cannot read {}: {e}", path.display()),
        }])
    };
    let bytes = read.map_err(|e| cannot_read(&e))?;
    let text = String::from_utf8(bytes).map_err(|e| cannot_read(&e))?;
    Config::parse(&text)
}

/// Watches the config file's directory (so editors that replace the file
/// by renaming are seen too) and reloads after each burst of changes that
/// leaves the file's bytes different.
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
            let Ok(event) = event else { return };
            let ours = event
                .paths
                .iter()
                .any(|p| p.file_name() == Some(name.as_os_str()));
            // After an overflow the kernel dropped events, perhaps ours.
            if event.need_rescan() || (ours && may_change_content(&event.kind)) {
                let _ = tx.send(());
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
            let _ = tokio::task::spawn_blocking(move || reload_if_changed(&gateway, &path)).await;
        }
    }
}
