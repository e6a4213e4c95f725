//! What an instance needs from the GPUs: the explicit claim of its start command, or an
//! estimate from its model (a file's headers, a profile, or numbers) and backend options.
//! Model files are read only under the analyzer's model roots, on the blocking pool, within
//! a deadline after which the read is cancelled; profiles read from files are cached by
//! canonical path, size and modification time.

use berth_fit::{Request, Shape};
use berth_models::{
    EstimateOptions, LlamaCppOptions, ModelAccess, ModelProfile, ModelRef, ModelRoots, ReadCancel,
    read_profile, resolve, shapes, workers_note,
};
use berth_proto::StartSpec;
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

/// Profiles kept per file at most.
const CACHE_CAP: usize = 1024;

type Key = (PathBuf, u64, Option<SystemTime>);
type Cache = Mutex<HashMap<Key, Arc<ModelProfile>>>;

#[derive(Debug)]
pub struct ProfileCache {
    entries: Arc<Cache>,
    roots: ModelRoots,
    /// A model's headers not read within this long are given up on (and the read stopped).
    read_timeout: Duration,
}

impl Default for ProfileCache {
    /// No model root: every model path is refused.
    fn default() -> Self {
        ProfileCache::new(ModelRoots::none(), Duration::from_secs(10))
    }
}

impl ProfileCache {
    pub fn new(roots: ModelRoots, read_timeout: Duration) -> Self {
        ProfileCache {
            entries: Arc::default(),
            roots,
            read_timeout,
        }
    }

    /// The profile of `model`, reading a file only when it changed since the last read.
    /// Runs file reads on the blocking pool, cancelled when they take longer than the read
    /// timeout or when this future is dropped.
    pub async fn resolve(&self, model: &ModelRef) -> Result<Arc<ModelProfile>, String> {
        let ModelRef::Path(path) = model else {
            let access = ModelAccess::new(self.roots.clone(), ReadCancel::new());
            return resolve(model, &access)
                .map(Arc::new)
                .map_err(|e| e.to_string());
        };
        let cancel = ReadCancel::until(Instant::now() + self.read_timeout);
        let _stop_reading = cancel.cancel_on_drop();
        let access = ModelAccess::new(self.roots.clone(), cancel);
        let entries = self.entries.clone();
        let owned = path.clone();
        let read = tokio::task::spawn_blocking(move || cached_read(&owned, &access, &entries));
        let shown = path.display();
        match tokio::time::timeout(self.read_timeout, read).await {
            Err(_) => Err(format!(
                "model {shown}: its headers were not read within {:?}",
                self.read_timeout
            )),
            Ok(Err(e)) => Err(format!("profile task failed: {e}")),
            Ok(Ok(r)) => r.map_err(|e| format!("model {shown}: {e}")),
        }
    }
    /// The fit request for `spec`: its explicit claim, or the shapes its model can run in
    /// (an estimate per shape), with where it may run.
    pub async fn request(&self, spec: &StartSpec) -> Result<Request, String> {
        let base = Request {
            shapes: Vec::new(),
            selector: spec.selector.clone(),
            gpu_name: spec.gpu_name.clone(),
            gpu_ids: spec.gpu_ids.clone(),
            group: spec.group().map(str::to_owned),
            note: None,
        };
        if spec.vram_bytes > 0 || spec.model_ref.is_none() {
            let gpus = u32::try_from(spec.gpu_count()).unwrap_or(u32::MAX);
            return Ok(Request {
                shapes: vec![Shape::new(spec.vram_per_gpu(), gpus)],
                ..base
            });
        }
        let Some(model) = &spec.model_ref else {
            return Err("no vram_bytes and no model_ref".into());
        };
        let profile = self.resolve(model).await?;
        let options = spec.backend.as_deref().cloned().unwrap_or_else(|| {
            EstimateOptions::LlamaCpp(LlamaCppOptions {
                gpus: u32::try_from(spec.gpus).unwrap_or(1),
                ..Default::default()
            })
        });
        let scaling = spec.scaling.clone().unwrap_or_default();
        let shapes = shapes(&profile, &options, &scaling).map_err(|e| e.to_string())?;
        Ok(Request {
            shapes,
            note: workers_note(&options, &scaling),
            ..base
        })
    }
}

/// The cached profile of the model at `path` if its file is unchanged, else the one read now.
/// The file is opened (checked against the roots) either way, so a cached profile is never
/// handed out for a path that is refused now.
fn cached_read(
    path: &Path,
    access: &ModelAccess,
    entries: &Cache,
) -> Result<Arc<ModelProfile>, berth_models::ProfileError> {
    let opened = access.roots.open(path)?;
    let key = (
        opened.path.clone(),
        opened.meta.len(),
        opened.meta.modified().ok(),
    );
    drop(opened);
    if let Some(hit) = entries.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(hit);
    }
    let profile = Arc::new(read_profile(&key.0, access)?);
    if let Ok(mut m) = entries.lock() {
        if m.len() >= CACHE_CAP {
            m.clear();
        }
        m.insert(key, profile.clone());
    }
    Ok(profile)
}
