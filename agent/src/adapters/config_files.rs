//! Reading the agent's configuration from the host: `/etc/clusteros/agent.toml`, the systemd
//! credentials directory and the cluster secret file. Parsing, merging and validating are
//! [`crate::core::config`]'s; this module only reads the files.

use std::path::Path;

use crate::core::config::{Config, ConfigError, Credentials, FileConfig, Overrides, parse_toml};

impl Config {
    /// Loads the file (a missing file is fine unless `path_required`), the credentials directory
    /// and the overrides, then validates the result.
    pub fn load(
        path: &Path,
        path_required: bool,
        credentials_dir: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let file = match std::fs::read_to_string(path) {
            Ok(text) => parse_toml(path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !path_required => FileConfig::default(),
            Err(source) => return Err(ConfigError::Read { path: path.to_owned(), source }),
        };
        let creds = match credentials_dir {
            Some(dir) => Credentials::read(dir)?,
            None => Credentials::default(),
        };
        Self::merge(file, creds, overrides)
    }

    pub(crate) fn merge(file: FileConfig, creds: Credentials, o: &Overrides) -> Result<Config, ConfigError> {
        Self::resolve(file, creds, o, &|p| std::fs::read_to_string(p))
    }
}

impl Credentials {
    pub(crate) fn read(dir: &Path) -> Result<Credentials, ConfigError> {
        Self::decode(|name| match std::fs::read_to_string(dir.join(name)) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ConfigError::Credential { name: name.into(), dir: dir.into(), source }),
        })
    }
}
