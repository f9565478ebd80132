//! The embedded runtime policy on disk: `<data dir>/runtime-policy.json`, so that a restart
//! (crash, OOM kill, reschedule, deploy) does not silently undo what an operator changed at
//! runtime (`PATCH /api/v1/enforcement/runtime`: a kill switch, a freeze, tightened guards) and
//! `policy_version` never goes backwards. Fleet mode keeps the same knobs in Redis instead
//! (`store::redis::policy`).
//!
//! The file is one JSON object, `{"version": <policy_version>, "knobs": {…}, "base": {…}}`, both
//! maps in the one serialisation of the runtime knobs (`store::knobs::Knobs`): `knobs` are the
//! values in force when it was written, `base` the values the local configuration (environment)
//! had then. It is rewritten whole, atomically and durably (`journal::install`: temporary file,
//! fsync, rename, fsync of the directory) before a change is published, so a crash leaves the
//! previous or the new file, never a mix. When to write is `store::memory::MemoryPolicy`'s
//! business; this module owns the format, the write, the load and the start-up merge:
//!
//! - **Per knob, three-way.** When the configuration still has the knob's `base` value, the
//!   saved value is restored (a plain restart keeps an incident override); when the
//!   configuration changed it since, the configuration wins (the operator redeployed with a new
//!   intent). Both are logged with the knob's name when the saved value differs from the
//!   configuration's. A knob the file lacks takes the configuration's value.
//! - **Version.** A start that finds a file runs `saved version + 1` (never less than the
//!   configuration's): whatever was restored, the policy in force after a restart is assembled
//!   anew (environment and files re-read, as a `SIGHUP` reload does, which bumps it too), so no
//!   version ever names two different policies and ledger readers can order changes.
//! - **A bad saved value** (wrong type, not a mode, outside the range `PATCH /runtime` accepts: a
//!   hand-edited file) is not restored: that knob keeps the configuration's value, logged as an
//!   error and listed as `rejected`; the other knobs are restored (a saved kill switch survives).
//! - A missing file is a first start: the configuration as is.
//! - A file that cannot be read or parsed as this format is moved aside (`runtime-policy.json.corrupt`, for
//!   inspection) with a warning, and the configuration is in force — the sidecar still starts,
//!   as with the daily counts snapshot (`store::daily`). The version resumes after the one the
//!   file names when that much can still be read.
//!
//! Owns: the file format, `write`, `restore` (load + pure `merge`), `peek` (read-only, for tools). Imports: `store::journal`,
//! `store::knobs`, `decide::Policy`, serde, serde_json, tracing, std.

use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use super::journal;
use super::knobs::Knobs;
use crate::decide::Policy;

/// The file's name in the data directory.
pub(crate) const FILE: &str = "runtime-policy.json";
pub(crate) const TMP_FILE: &str = "runtime-policy.json.tmp";
/// Where an unreadable file is moved (the latest one only).
pub(crate) const CORRUPT_FILE: &str = "runtime-policy.json.corrupt";

#[derive(Serialize)]
struct Out<'a> {
    version: u64,
    knobs: &'a Knobs,
    base: &'a Knobs,
}

/// The file's content as read (knob maps kept loose: a field the file lacks, or one a later
/// version added, is settled per knob by [`merge`]).
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Saved {
    pub(crate) version: u64,
    pub(crate) knobs: Map<String, Json>,
    pub(crate) base: Map<String, Json>,
}

/// Replaces the file in `dir`: `version` and `knobs` in force, `base` the configuration's knobs.
/// Atomic and durable when it returns `Ok`; on error the previous file is left as it was.
pub(crate) fn write(dir: &Path, version: u64, knobs: &Knobs, base: &Knobs) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(&Out { version, knobs, base }).map_err(io::Error::other)?;
    bytes.push(b'\n');
    journal::install(dir, TMP_FILE, &dir.join(FILE), &bytes).map(drop)
}

/// One knob whose saved value differs from the configuration's, and which of the two is in force.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct KnobOutcome {
    pub(crate) knob: String,
    pub(crate) saved: Json,
    pub(crate) configured: Json,
}

/// What [`merge`] decided.
#[derive(Debug)]
pub(crate) struct Merged {
    /// The configuration's policy with the restored knobs and the resumed version.
    pub(crate) policy: Policy,
    /// Knobs whose saved value is back in force (the configuration still had their base value).
    pub(crate) restored: Vec<KnobOutcome>,
    /// Knobs whose saved value was dropped: the configuration changed them since.
    pub(crate) configuration_won: Vec<KnobOutcome>,
    /// Knobs whose saved value was dropped because it is not one `PATCH /runtime` could have
    /// written (wrong type, not a mode, out of range): the configuration's value is in force.
    pub(crate) rejected: Vec<KnobOutcome>,
}

/// Two knob values are the same (numbers compare as numbers: a float read back from the file may
/// differ from the configuration's in its last bit).
fn same(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) if x.is_f64() || y.is_f64() => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * x.abs().max(y.abs()).max(1.0),
            _ => false,
        },
        _ => a == b,
    }
}

/// The policy to start with: `config` (the local configuration's) with each knob of `saved`
/// restored where the configuration still has the knob's base value, at `saved.version + 1`.
/// Pure. A saved value of the wrong type, a mode that does not parse, or a value outside the
/// range `PATCH /runtime` accepts (a hand-edited file) is not restored: that knob keeps the
/// configuration's value and is listed in `rejected`, and the other knobs are restored as usual
/// (one bad value must not drop a saved kill switch).
pub(crate) fn merge(config: &Policy, saved: &Saved) -> Merged {
    let configured = Knobs::of(config).to_map();
    let mut out = Map::new();
    let (mut restored, mut configuration_won) = (Vec::new(), Vec::new());
    for (knob, conf) in &configured {
        let (Some(base), Some(value)) = (saved.base.get(knob), saved.knobs.get(knob)) else { continue };
        if same(value, conf) {
            continue;
        }
        let outcome = KnobOutcome { knob: knob.clone(), saved: value.clone(), configured: conf.clone() };
        if same(base, conf) {
            out.insert(knob.clone(), value.clone());
            restored.push(outcome);
        } else {
            configuration_won.push(outcome);
        }
    }
    let (knobs, bad) = Knobs::merged(&Knobs::of(config), &out);
    let (rejected, restored) = restored.into_iter().partition(|k| bad.contains(&k.knob));
    let mut policy = config.clone();
    knobs.apply(&mut policy);
    policy.version = config.version.max(saved.version.saturating_add(1));
    Merged { policy, restored, configuration_won, rejected }
}

/// What a start found in the data directory.
#[derive(Debug)]
pub(crate) enum Found {
    /// No file: a first start.
    Nothing,
    /// The file, merged with the configuration.
    Merged(Merged),
    /// An unreadable file, moved aside: the configuration's policy, at the version after the one
    /// the file still names (if any).
    Unreadable(Policy),
}

impl Found {
    /// The policy to start with.
    pub(crate) fn policy(&self, config: &Policy) -> Policy {
        match self {
            Found::Nothing => config.clone(),
            Found::Merged(m) => m.policy.clone(),
            Found::Unreadable(p) => p.clone(),
        }
    }

    /// What the start changed against the configuration, for the `runtime_changed` event of a
    /// restart (`None` on a first start): the knobs restored (`{knob: value}`), those whose saved
    /// value the configuration overrode or that was rejected as bad (each `{knob: {"dropped",
    /// "configured"}}`), and whether the file was unreadable (moved aside).
    pub(crate) fn changes(&self) -> Option<Json> {
        match self {
            Found::Nothing => None,
            Found::Merged(m) => {
                let restored: Map<String, Json> =
                    m.restored.iter().map(|k| (k.knob.clone(), k.saved.clone())).collect();
                Some(serde_json::json!({
                    "restored": restored,
                    "configuration_won": dropped(&m.configuration_won),
                    "rejected": dropped(&m.rejected),
                }))
            }
            Found::Unreadable(_) => Some(serde_json::json!({"unreadable_file_moved_to": CORRUPT_FILE})),
        }
    }
}

/// Knobs whose saved value is not in force, as `{knob: {"dropped", "configured"}}`.
fn dropped(outcomes: &[KnobOutcome]) -> Map<String, Json> {
    outcomes
        .iter()
        .map(|k| (k.knob.clone(), serde_json::json!({"dropped": k.saved, "configured": k.configured})))
        .collect()
}

/// Why the file cannot be used, and the version it still names (if any).
type Unusable = (String, Option<u64>);

/// The file in `dir` read and merged with `config` (with the version it saved), nothing logged
/// or moved: `Ok(None)` when there is none.
fn read(dir: &Path, config: &Policy) -> Result<Option<(u64, Merged)>, Unusable> {
    let bytes = match fs::read(dir.join(FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err((e.to_string(), None)),
    };
    let saved: Saved = serde_json::from_slice(&bytes).map_err(|e| {
        let version = serde_json::from_slice::<Json>(&bytes).ok().and_then(|v| v.get("version")?.as_u64());
        (e.to_string(), version)
    })?;
    Ok(Some((saved.version, merge(config, &saved))))
}

/// The policy a sidecar on `dir` runs (or would start with), read without changing anything:
/// for tools beside it (`mint-approval`). `Ok(None)`: no file, the configuration as is. An
/// unreadable file is an error here (the sidecar, not a tool, moves it aside).
pub fn peek(dir: &Path, config: &Policy) -> Result<Option<Policy>, String> {
    match read(dir, config) {
        // The version in force now is the saved one (a restart would move to the next).
        Ok(found) => Ok(found.map(|(saved, m)| Policy { version: saved, ..m.policy })),
        Err((e, _)) => Err(format!("{}: {e}", dir.join(FILE).display())),
    }
}

/// Reads the file in `dir` and merges it with `config` (see the module docs); logs what was
/// restored, what the configuration overrode, and an unreadable file (moved aside).
pub(crate) fn restore(dir: &Path, config: &Policy) -> Found {
    let path = dir.join(FILE);
    let (saved_version, merged) = match read(dir, config) {
        Ok(Some(found)) => found,
        Ok(None) => return Found::Nothing,
        Err((e, version)) => return unreadable(dir, config, &e, version),
    };
    for k in &merged.restored {
        tracing::warn!(
            path = %path.display(),
            knob = %k.knob,
            value = %k.saved,
            configured = %k.configured,
            "runtime policy: restored a runtime change made before the restart (PATCH /api/v1/enforcement/runtime); \
             it stays in force until changed by PATCH or by changing this setting in the configuration"
        );
    }
    for k in &merged.configuration_won {
        tracing::warn!(
            path = %path.display(),
            knob = %k.knob,
            dropped_value = %k.saved,
            configured = %k.configured,
            "runtime policy: the configuration changed this setting since it was changed at runtime; \
             the configuration's value is in force, the runtime change is dropped"
        );
    }
    for k in &merged.rejected {
        tracing::error!(
            path = %path.display(),
            knob = %k.knob,
            dropped_value = %k.saved,
            configured = %k.configured,
            "runtime policy: the saved value of this setting is of the wrong type or outside the range \
             PATCH /api/v1/enforcement/runtime accepts (was the file edited by hand?); the configuration's value is \
             in force and the other settings were restored. Set it again with PATCH if the change is still wanted"
        );
    }
    tracing::info!(
        path = %path.display(),
        saved_version,
        policy_version = merged.policy.version,
        restored = merged.restored.len(),
        configuration_won = merged.configuration_won.len(),
        rejected = merged.rejected.len(),
        "runtime policy: resumed from the data directory"
    );
    Found::Merged(merged)
}

fn unreadable(dir: &Path, config: &Policy, error: &str, saved_version: Option<u64>) -> Found {
    let (path, aside) = (dir.join(FILE), dir.join(CORRUPT_FILE));
    let moved = fs::rename(&path, &aside);
    let mut policy = config.clone();
    if let Some(v) = saved_version {
        policy.version = policy.version.max(v.saturating_add(1));
    }
    tracing::warn!(
        path = %path.display(),
        error,
        moved_to = %aside.display(),
        moved = moved.is_ok(),
        policy_version = policy.version,
        "runtime policy: the saved runtime policy cannot be read; starting from the configuration. Runtime \
         changes made before the restart (kill switch, approval issuance freeze, guards, modes) are NOT in \
         force on this replica: check GET /api/v1/enforcement/runtime and PATCH them again if the incident \
         is still open. Check the data volume (disk errors, full disk, permissions of PREAUTH_DATA_DIR); the \
         file was moved aside for inspection (delete it when done)"
    );
    Found::Unreadable(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Mode;
    use crate::ledger::outbox::tests::TempDir;
    use serde_json::json;

    /// The file a replica running `config` writes after `change` was PATCHed, at `version`.
    fn saved_after(config: &Policy, version: u64, change: impl FnOnce(&mut Policy)) -> Saved {
        let mut p = config.clone();
        change(&mut p);
        Saved { version, knobs: Knobs::of(&p).to_map(), base: Knobs::of(config).to_map() }
    }

    fn knobs(o: &[KnobOutcome]) -> Vec<&str> {
        o.iter().map(|k| k.knob.as_str()).collect()
    }

    #[test]
    fn an_unchanged_configuration_gets_the_runtime_changes_back() {
        let config = Policy::for_test();
        let saved = saved_after(&config, 4, |p| {
            p.kill_switch = true;
            p.approval_issuance_frozen = true;
            p.source_modes = vec![("batch".into(), Mode::Shadow)];
            p.audit_sample_rate = 0.3;
        });
        let m = merge(&config, &saved);
        assert!(m.policy.kill_switch && m.policy.approval_issuance_frozen);
        assert_eq!(m.policy.source_modes, vec![("batch".to_string(), Mode::Shadow)]);
        assert_eq!(m.policy.audit_sample_rate, 0.3);
        assert_eq!(
            knobs(&m.restored),
            vec!["approval_issuance_frozen", "audit_sample_rate", "kill_switch", "source_modes"]
        );
        assert!(m.configuration_won.is_empty());
        assert_eq!(m.policy.version, 5, "resumes after the saved version");
        assert_eq!(m.policy.directory, config.directory, "local parts stay the configuration's");
    }

    #[test]
    fn a_knob_the_configuration_changed_since_takes_the_configuration_value() {
        let old = Policy::for_test();
        let saved = saved_after(&old, 9, |p| {
            p.fair_use.per_minute_cap = 5;
            p.kill_switch = true;
        });
        let mut config = old.clone();
        config.fair_use.per_minute_cap = 12;
        let m = merge(&config, &saved);
        assert_eq!(m.policy.fair_use.per_minute_cap, 12, "the redeployed intent wins");
        assert!(m.policy.kill_switch, "an untouched knob is still restored");
        assert_eq!(
            m.configuration_won,
            vec![KnobOutcome { knob: "fair_use_per_minute_cap".into(), saved: json!(5), configured: json!(12) }]
        );
        assert_eq!(knobs(&m.restored), vec!["kill_switch"]);
        // A runtime change the configuration now agrees with is neither.
        let mut config = old.clone();
        config.kill_switch = true;
        let m = merge(&config, &saved);
        assert!(m.policy.kill_switch);
        assert_eq!(knobs(&m.restored), vec!["fair_use_per_minute_cap"]);
        assert!(m.configuration_won.is_empty());
    }

    #[test]
    fn missing_and_unknown_knobs_and_float_noise_are_tolerated_bad_values_are_not() {
        let config = Policy::for_test();
        let mut saved = saved_after(&config, 1, |p| p.kill_switch = true);
        saved.knobs.remove("global_abuse_per_minute_cap");
        saved.knobs.insert("knob_of_a_later_version".into(), json!(1));
        saved.base.insert("audit_sample_rate".into(), json!(0.010000000000000002));
        let m = merge(&config, &saved);
        assert!(m.policy.kill_switch);
        assert_eq!(m.policy.global.per_minute_cap, config.global.per_minute_cap);
        assert_eq!(knobs(&m.restored), vec!["kill_switch"]);

        // Values PATCH /runtime would refuse (a hand-edited file) keep the configuration's
        // value, each named; the saved kill switch is restored all the same.
        let mut bad = saved_after(&config, 1, |p| p.kill_switch = true);
        bad.knobs.insert("audit_sample_rate".into(), json!("yes"));
        bad.knobs.insert("enforcement_mode".into(), json!("strict"));
        bad.knobs.insert("global_abuse_block_seconds".into(), json!(5));
        let m = merge(&config, &bad);
        assert!(m.policy.kill_switch);
        assert_eq!(knobs(&m.restored), vec!["kill_switch"]);
        let mut rejected = knobs(&m.rejected);
        rejected.sort();
        assert_eq!(rejected, vec!["audit_sample_rate", "enforcement_mode", "global_abuse_block_seconds"]);
        assert_eq!(Knobs::of(&m.policy), Knobs { kill_switch: true, ..Knobs::of(&config) });
        let changes = Found::Merged(m).changes().unwrap();
        assert_eq!(
            changes["rejected"]["global_abuse_block_seconds"],
            json!({"dropped": 5, "configured": config.global.block_seconds})
        );
    }

    #[test]
    fn written_files_restore_and_the_version_only_goes_up() {
        let tmp = TempDir::new("rtp");
        let d = tmp.0.clone();
        let config = Policy::for_test();
        assert!(matches!(restore(&d, &config), Found::Nothing));
        let mut p = config.clone();
        p.kill_switch = true;
        write(&d, 3, &Knobs::of(&p), &Knobs::of(&config)).unwrap();
        assert!(!d.join(TMP_FILE).exists());
        let Found::Merged(m) = restore(&d, &config) else { panic!("file written above") };
        assert!(m.policy.kill_switch);
        assert_eq!(m.policy.version, 4);
        // Never below the configuration's own version.
        let mut high = config.clone();
        high.version = 10;
        assert_eq!(restore(&d, &high).policy(&high).version, 10);
    }

    #[test]
    fn an_unreadable_file_is_moved_aside_and_the_configuration_starts() {
        let tmp = TempDir::new("rtp");
        let d = tmp.0.clone();
        let config = Policy::for_test();
        for (garbage, version) in [
            (&b"{\"version\": 7, \"knobs\": {\"kill_switch\": tr"[..], 1),
            (b"", 1),
            (b"\x00\xff", 1),
            (b"{\"version\": 7, \"knobs\": {}}", 8),
        ] {
            fs::write(d.join(FILE), garbage).unwrap();
            let found = restore(&d, &config);
            assert!(matches!(found, Found::Unreadable(_)), "{found:?}");
            let p = found.policy(&config);
            assert_eq!(Knobs::of(&p), Knobs::of(&config));
            assert_eq!(p.version, version, "resumes after a version the file still names");
            assert!(!d.join(FILE).exists());
            assert_eq!(fs::read(d.join(CORRUPT_FILE)).unwrap(), garbage, "kept for inspection");
        }
        // A well-formed file with a bad value is not unreadable: that knob is rejected.
        let mode = config.mode.as_str();
        let text = format!(
            r#"{{"version": 7, "knobs": {{"enforcement_mode": "strict"}}, "base": {{"enforcement_mode": "{mode}"}}}}"#
        );
        fs::write(d.join(FILE), &text).unwrap();
        let Found::Merged(m) = restore(&d, &config) else { panic!("a bad value is rejected, the file is read") };
        assert_eq!((knobs(&m.rejected), m.policy.version), (vec!["enforcement_mode"], 8));
        assert_eq!(Knobs::of(&m.policy), Knobs::of(&config));
    }
}
