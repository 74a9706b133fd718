//! Discovery of a plugins directory: every `<dir>/*/plugin.toml`, broken ones reported beside
//! the good ones, and no task name served twice.

use super::{Manifest, ManifestError, MANIFEST_FILE};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a scan of the plugins directory found.
#[derive(Debug, Default)]
pub struct Discovery {
    pub plugins: Vec<Manifest>,
    pub errors: Vec<ManifestError>,
}

impl Discovery {
    /// The manifest error of the plugin directory named `name`, if its manifest is broken.
    pub fn error_for(&self, name: &str) -> Option<&ManifestError> {
        self.errors.iter().find(|e| {
            e.path
                .parent()
                .and_then(|p| p.file_name())
                .is_some_and(|f| f == name)
        })
    }
}

/// Loads every `<dir>/*/plugin.toml`, sorted by name. Plugins whose manifests are broken, or
/// that claim a task name another plugin already serves, go to `errors` instead.
pub fn discover(dir: &Path) -> Result<Discovery, std::io::Error> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join(MANIFEST_FILE).is_file())
        .collect();
    dirs.sort();
    let mut found = Discovery::default();
    let mut owners: HashMap<String, String> = HashMap::new();
    let mut names: HashMap<String, PathBuf> = HashMap::new();
    for d in dirs {
        match Manifest::load(&d) {
            Ok(m) => {
                let path = d.join(MANIFEST_FILE);
                if let Some(other) = names.get(&m.name) {
                    found.errors.push(ManifestError {
                        path,
                        message: format!(
                            "plugin name `{}` is already used by {}",
                            m.name,
                            other.display()
                        ),
                    });
                    continue;
                }
                if let Some((task, owner)) =
                    m.task_names().find_map(|t| owners.get(t).map(|o| (t, o)))
                {
                    found.errors.push(ManifestError {
                        path,
                        message: format!("task `{task}` is already served by plugin `{owner}`"),
                    });
                    continue;
                }
                for t in m.task_names() {
                    owners.insert(t.to_string(), m.name.clone());
                }
                names.insert(m.name.clone(), path);
                found.plugins.push(m);
            }
            Err(e) => found.errors.push(e),
        }
    }
    found.plugins.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}
