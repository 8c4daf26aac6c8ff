//! The image under test: a private snapshot of `target/image`, so that a rebuild while a test runs
//! cannot change the disk (or its root=PARTUUID) under a VM.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Where image/build puts its outputs (`CLUSTEROS_IMAGE_DIR` overrides).
pub fn image_dir() -> PathBuf {
    std::env::var_os("CLUSTEROS_IMAGE_DIR").map(PathBuf::from).unwrap_or_else(|| crate::target_dir().join("image"))
}

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

#[derive(Debug, Clone)]
pub struct Image {
    /// GPT disk: ESP (systemd-boot + UKI) and root. VMs boot qcow2 overlays on it.
    pub raw: PathBuf,
    pub vmlinuz: PathBuf,
    /// The image's initrd (`--boot initrd`), when image/build made one.
    pub initrd: Option<PathBuf>,
    /// Kernel command line for direct boot (root=PARTUUID=... of `raw`).
    pub cmdline: String,
}

impl Image {
    /// Copies the image from `src` (sparse, well under a second) into `dst`, and checks that the
    /// command line's root=PARTUUID names a partition of the copied disk (it changes every build).
    pub fn snapshot(src: &Path, dst: &Path) -> Result<Image> {
        for f in ["clusteros.raw", "clusteros.vmlinuz", "clusteros.cmdline"] {
            let p = src.join(f);
            if !p.is_file() {
                bail!("{} missing: build the image first (`make image`, or set CLUSTEROS_IMAGE_DIR)", p.display());
            }
        }
        std::fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
        let initrd = src.join("clusteros.initrd").is_file().then(|| dst.join("base.initrd"));
        let img =
            Image { raw: dst.join("base.raw"), vmlinuz: dst.join("base.vmlinuz"), initrd, cmdline: String::new() };
        // An image/build finishing between two copies would pair a command line with another
        // build's disk: retry a few times, then report it.
        let mut last = String::new();
        for _ in 0..3 {
            let cmdline = std::fs::read_to_string(src.join("clusteros.cmdline"))?.trim().to_string();
            let from = src.join("clusteros.raw");
            crate::run_cmd("cp", &["--sparse=always", path_str(&from)?, path_str(&img.raw)?])?;
            std::fs::copy(src.join("clusteros.vmlinuz"), &img.vmlinuz)?;
            if let Some(initrd) = &img.initrd {
                std::fs::copy(src.join("clusteros.initrd"), initrd)?;
            }
            let Some(want) = root_partuuid(&cmdline) else {
                bail!("{}: no root=PARTUUID= in {cmdline:?}", src.join("clusteros.cmdline").display());
            };
            let have = gpt_partition_uuids(&img.raw)?;
            if have.iter().any(|u| u.eq_ignore_ascii_case(&want)) {
                std::fs::write(dst.join("base.cmdline"), &cmdline)?;
                return Ok(Image { cmdline, ..img });
            }
            last = format!("root=PARTUUID={want} is not a partition of the disk (it has {have:?})");
        }
        bail!("{} and its clusteros.cmdline do not match (is image/build running?): {last}", src.display())
    }
}

impl Image {
    /// A snapshot that [`Image::snapshot`] made in `dir` earlier.
    pub fn open_snapshot(dir: &Path) -> Result<Image> {
        let cmdline = std::fs::read_to_string(dir.join("base.cmdline"))
            .with_context(|| format!("no image snapshot in {}", dir.display()))?;
        let initrd = dir.join("base.initrd");
        Ok(Image {
            raw: dir.join("base.raw"),
            vmlinuz: dir.join("base.vmlinuz"),
            initrd: initrd.is_file().then_some(initrd),
            cmdline: cmdline.trim().to_string(),
        })
    }
}

impl Image {
    /// Writes the raw image onto a new blank raw disk file `disk` of `size` bytes, the way a
    /// person flashes a real disk (`dd if=clusteros.raw of=/dev/sdX bs=4M conv=fsync`). The disk must be at least 1 GiB larger than the image, so that growing it shows.
    pub fn flash_onto(&self, disk: &Path, size: u64) -> Result<()> {
        let raw_len = std::fs::metadata(&self.raw).with_context(|| format!("{}", self.raw.display()))?.len();
        if size < raw_len + (1 << 30) {
            bail!("a {size}-byte disk is not at least 1 GiB larger than the {raw_len}-byte image");
        }
        if disk.exists() {
            bail!("{} exists already", disk.display());
        }
        // The same bytes as dd onto a zeroed disk: the image, then zeros to the end (a sparse copy
        // of the image, extended: well under a second, where dd reads all of it).
        crate::run_cmd("cp", &["--sparse=always", path_str(&self.raw)?, path_str(disk)?])?;
        let f = std::fs::OpenOptions::new().write(true).open(disk)?;
        f.set_len(size)?;
        Ok(())
    }
}

pub(crate) fn path_str(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| format!("path is not UTF-8: {}", p.display()))
}

fn root_partuuid(cmdline: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|a| a.strip_prefix("root=PARTUUID=")).map(str::to_string)
}

/// One entry of a GPT partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// The unique partition GUID (lowercase).
    pub uuid: String,
    /// The partition label (GPT name).
    pub label: String,
    /// Byte offset of its first sector (512-byte sectors).
    pub offset: u64,
}

/// The unique partition GUIDs of a GPT disk (512-byte sectors), as lowercase strings.
pub fn gpt_partition_uuids(disk: &Path) -> Result<Vec<String>> {
    Ok(gpt_partitions(disk)?.into_iter().map(|p| p.uuid).collect())
}

/// The partitions of a GPT disk (512-byte sectors).
pub fn gpt_partitions(disk: &Path) -> Result<Vec<Partition>> {
    let mut f = std::fs::File::open(disk).with_context(|| format!("cannot open {}", disk.display()))?;
    let mut hdr = [0u8; 92];
    f.seek(SeekFrom::Start(512))?;
    f.read_exact(&mut hdr)?;
    if &hdr[0..8] != b"EFI PART" {
        bail!("{}: no GPT header", disk.display());
    }
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let entries_lba = u64_at(&hdr, 72);
    let count = u32_at(&hdr, 80).min(1024) as usize;
    let size = u32_at(&hdr, 84) as usize;
    if !(128..=4096).contains(&size) {
        bail!("{}: odd GPT entry size {size}", disk.display());
    }
    let mut table = vec![0u8; count * size];
    f.seek(SeekFrom::Start(entries_lba * 512))?;
    f.read_exact(&mut table)?;
    Ok(table
        .chunks(size)
        .filter(|e| e[0..16].iter().any(|b| *b != 0))
        .map(|e| {
            // The name: 36 UTF-16LE code units, NUL-padded.
            let units: Vec<u16> = e[56..128].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
            let label = String::from_utf16_lossy(&units).trim_end_matches('\0').to_string();
            Partition {
                uuid: guid_string(e[16..32].try_into().expect("16 bytes")),
                label,
                offset: u64_at(e, 32).saturating_mul(512),
            }
        })
        .collect())
}

/// A GPT GUID as text: the first three fields are little-endian.
fn guid_string(g: [u8; 16]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10..16].iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_text_is_mixed_endian() {
        let g = [0x46, 0xda, 0x2f, 0x15, 0xa4, 0xff, 0xb4, 0x4b, 0x99, 0x75, 0xfb, 0x8a, 0x9f, 0xbd, 0x2c, 0xae];
        assert_eq!(guid_string(g), "152fda46-ffa4-4bb4-9975-fb8a9fbd2cae");
    }

    #[test]
    fn partuuid_is_read_from_the_command_line() {
        assert_eq!(root_partuuid("root=PARTUUID=abc rw console=ttyS0").as_deref(), Some("abc"));
        assert_eq!(root_partuuid("root=/dev/vda2"), None);
    }
}
