//! Config renderers (pure): typed values rendered with `Display`, built from the replicated state,
//! checked against golden files in `testdata/`. A renderer refuses to produce a broken file (for
//! example `SlurmctldHost=` with no host) and says what is missing instead.

pub mod k3s;
pub mod slurm;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("no SLURM controller is assigned yet, so slurm.conf cannot name a SlurmctldHost")]
    NoController,
    #[error("member {0} has no mesh address yet")]
    NoMeshAddress(String),
    #[error("member {0} is not in the cluster state")]
    UnknownMember(String),
    #[error("no k3s server is assigned yet")]
    NoK3sServer,
    #[error("the k3s token has not been generated yet")]
    NoK3sToken,
    #[error("{0} is not a valid name for a SLURM node: use letters, digits and '-'")]
    BadNodeName(String),
}

#[cfg(test)]
pub(crate) fn check_golden(name: &str, actual: &str) {
    check_golden_in("src/core/render/testdata", name, actual)
}

/// [`check_golden`] for the golden file `name` in `dir` (relative to the agent crate).
#[cfg(test)]
pub(crate) fn check_golden_in(dir: &str, name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("golden file {}: {e} (create it with UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(actual, want, "rendered output differs from {} (UPDATE_GOLDEN=1 rewrites it)", path.display());
}
