//! The plugins directory as the CLI reads it: what is available to install or run.

use crate::config::Config;
use crate::manifest;
use anyhow::Context;

/// The plugins directory's plugins (broken ones beside them), or an error naming the setting.
pub(super) fn discover(config: &Config) -> anyhow::Result<manifest::Discovery> {
    let dir = &config.plugins_dir;
    manifest::discover(dir).with_context(|| {
        format!(
            "cannot read the plugins directory {} (set --plugins or `plugins_dir`)",
            dir.display()
        )
    })
}
