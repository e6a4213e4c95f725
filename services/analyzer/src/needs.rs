//! What an instance needs from the GPUs: the explicit claim of its start command, or an
//! estimate from its model (a file's headers, a profile, or numbers) and backend options.
//! Profiles read from files are cached by path, size and modification time.

use berth_fit::{Request, Shape};
use berth_models::{
    EstimateOptions, LlamaCppOptions, ModelProfile, ModelRef, resolve, shapes, workers_note,
};
use berth_proto::StartSpec;
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

/// Profiles kept per file at most.
const CACHE_CAP: usize = 1024;

type Key = (PathBuf, u64, Option<SystemTime>);

#[derive(Debug, Default)]
pub struct ProfileCache {
    entries: Mutex<HashMap<Key, Arc<ModelProfile>>>,
}

impl ProfileCache {
    /// The profile of `model`, reading a file only when it changed since the last read.
    /// Runs file reads on the blocking pool.
    pub async fn resolve(&self, model: &ModelRef) -> Result<Arc<ModelProfile>, String> {
        let ModelRef::Path(path) = model else {
            return resolve(model).map(Arc::new).map_err(|e| e.to_string());
        };
        let meta = std::fs::metadata(path).map_err(|e| format!("model {}: {e}", path.display()))?;
        let key = (path.clone(), meta.len(), meta.modified().ok());
        if let Some(hit) = self.entries.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(hit);
        }
        let owned = model.clone();
        let profile = tokio::task::spawn_blocking(move || resolve(&owned))
            .await
            .map_err(|e| format!("profile task failed: {e}"))?
            .map_err(|e| format!("model {}: {e}", path.display()))?;
        let profile = Arc::new(profile);
        if let Ok(mut m) = self.entries.lock() {
            if m.len() >= CACHE_CAP {
                m.clear();
            }
            m.insert(key, profile.clone());
        }
        Ok(profile)
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
