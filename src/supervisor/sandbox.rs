//! `sandbox = "strict"`: a Landlock ruleset built before the fork (it opens the paths it
//! allows) and applied in the child just before exec. The plugin may read and run its installed
//! copy and the system, and write only its data directory, a private tmp and a few devices.
//! Best effort: on a kernel without Landlock the plugin runs unsandboxed, and the daemon says so.

use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr,
    ABI,
};
use std::io;
use std::path::Path;

/// The newest ABI this build knows; older kernels get what they support (best effort).
const ABI_WANTED: ABI = ABI::V5;

/// What every plugin may read and execute besides its own copy.
const SYSTEM: &[&str] = &[
    "/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/opt", "/proc", "/sys", "/run",
];

/// Devices a program commonly opens for writing.
const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// The Landlock ABI of this kernel, or `None` without Landlock.
pub fn kernel_abi() -> Option<i32> {
    // SAFETY: landlock_create_ruleset with a null attribute and the VERSION flag only reads.
    let version = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    (version > 0).then_some(version as i32)
}

/// The ruleset for a strict plugin whose copy is `code`, writing `data` and `tmp`.
pub fn strict(code: &Path, data: &Path, tmp: &Path) -> io::Result<RulesetCreated> {
    let abi = ABI_WANTED;
    let fail = |e: landlock::RulesetError| io::Error::other(format!("Landlock ruleset: {e}"));
    Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(fail)?
        .create()
        .map_err(fail)?
        .add_rules(path_beneath_rules(
            SYSTEM.iter().map(Path::new).chain([code]),
            AccessFs::from_read(abi),
        ))
        .map_err(fail)?
        .add_rules(path_beneath_rules(DEVICES, AccessFs::from_file(abi)))
        .map_err(fail)?
        .add_rules(path_beneath_rules([data, tmp], AccessFs::from_all(abi)))
        .map_err(fail)
}

/// Applies `ruleset` to the calling process. Runs between fork and exec: no allocation on the
/// success path. A kernel without Landlock is not an error here (reported by the daemon).
pub fn enter(ruleset: RulesetCreated) -> io::Result<()> {
    // NotEnforced (no Landlock in this kernel) is reported by the daemon, not failed here.
    match ruleset.restrict_self() {
        Ok(_) => Ok(()),
        Err(_) => Err(io::Error::from_raw_os_error(nix::libc::EPERM)),
    }
}
