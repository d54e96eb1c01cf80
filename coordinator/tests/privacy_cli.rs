//! `starling privacy epsilon | sigma | ledger` as a user runs them: the real binary, text and
//! `--json` output, with the PLD accountant by default and `--accountant rdp` on request.

use starling_coordinator::store::Store;
use starling_proto::dp::{LedgerEntry, Mechanism, NoiseMultiplier, SamplingRate};
use std::process::Command;

fn starling(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_starling")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

fn json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, stdout, stderr) = starling(&all);
    assert!(ok, "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

#[test]
fn epsilon_uses_pld_by_default_and_rdp_on_request() {
    let schedule =
        ["privacy", "epsilon", "--q", "0.0005", "--sigma", "1.3", "--rounds", "2000", "--delta", "1e-7"];
    let pld = json(&schedule);
    assert_eq!(pld["accountant"], "pld");
    assert!(pld["best_order"].is_null());
    let e = pld["epsilon"].as_f64().unwrap();
    assert!((0.07..0.11).contains(&e), "{pld}");
    assert_eq!(
        (pld["q"].as_f64(), pld["rounds"].as_u64(), pld["delta"].as_f64()),
        (Some(0.0005), Some(2000), Some(1e-7))
    );

    let mut with_rdp = schedule.to_vec();
    with_rdp.extend(["--accountant", "rdp"]);
    let rdp = json(&with_rdp);
    assert_eq!(rdp["accountant"], "rdp");
    assert!(rdp["best_order"].as_f64().is_some_and(|o| o > 1.0));
    let r = rdp["epsilon"].as_f64().unwrap();
    assert!((r - 0.502).abs() < 1e-3 && e < r, "{rdp}");

    let mut explicit = schedule.to_vec();
    explicit.extend(["--accountant", "pld"]);
    assert_eq!(json(&explicit)["epsilon"], pld["epsilon"]);

    // Text names the accountant too.
    let (ok, text, _) = starling(&schedule);
    assert!(ok && text.contains("PLD accountant") && text.starts_with("epsilon 0.08"), "{text}");
    let (ok, text, _) = starling(&with_rdp);
    assert!(ok && text.contains("RDP accountant, best order"), "{text}");

    // An unknown accountant is refused by the parser.
    let mut bad = schedule.to_vec();
    bad.extend(["--accountant", "moments"]);
    let (ok, _, err) = starling(&bad);
    assert!(!ok && err.contains("moments"), "{err}");
}

#[test]
fn sigma_calibrates_with_the_chosen_accountant() {
    let args = ["privacy", "sigma", "--q", "0.01", "--rounds", "1000", "--epsilon", "2"];
    let pld = json(&args);
    let mut rdp_args = args.to_vec();
    rdp_args.extend(["--accountant", "rdp"]);
    let rdp = json(&rdp_args);
    assert_eq!((pld["accountant"].as_str(), rdp["accountant"].as_str()), (Some("pld"), Some("rdp")));
    for out in [&pld, &rdp] {
        let e = out["epsilon"].as_f64().unwrap();
        assert!(e <= 2.0 && e > 1.99, "{out}");
        assert_eq!(out["target_epsilon"].as_f64(), Some(2.0));
    }
    // The tighter accountant needs less noise for the same budget.
    let (sp, sr) = (pld["sigma"].as_f64().unwrap(), rdp["sigma"].as_f64().unwrap());
    assert!(sp < sr && (sr - 1.0222).abs() < 1e-3, "pld {sp} rdp {sr}");
    let (ok, text, _) = starling(&args);
    assert!(ok && text.contains("PLD accountant"), "{text}");
}

#[test]
fn ledger_reads_a_store_with_either_accountant() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    {
        let mut store = Store::open(&path).unwrap();
        let mechanism = Mechanism {
            q: SamplingRate::new(0.01).unwrap(),
            sigma: NoiseMultiplier::new(1.1).unwrap(),
            steps: 1,
        };
        for round in 1..=500 {
            store.append_ledger(&LedgerEntry { round, mechanism }, 0).unwrap();
        }
    }
    let store = path.to_str().unwrap();
    let args = ["privacy", "ledger", "--store", store, "--epsilon", "8", "--q", "0.01", "--sigma", "1.1"];
    let pld = json(&args);
    let mut rdp_args = args.to_vec();
    rdp_args.extend(["--accountant", "rdp"]);
    let rdp = json(&rdp_args);
    assert_eq!((pld["accountant"].as_str(), rdp["accountant"].as_str()), (Some("pld"), Some("rdp")));
    assert_eq!((pld["releases"].as_u64(), rdp["releases"].as_u64()), (Some(500), Some(500)));
    assert!(pld["best_order"].is_null() && rdp["best_order"].as_f64().is_some());
    let (ep, er) = (pld["epsilon_spent"].as_f64().unwrap(), rdp["epsilon_spent"].as_f64().unwrap());
    assert!(0.0 < ep && ep < er, "pld {ep} rdp {er}");
    let (lp, lr) = (pld["rounds_left"].as_u64().unwrap(), rdp["rounds_left"].as_u64().unwrap());
    assert!(lp > lr && lr > 0, "pld {lp} rdp {lr}");
    let (ok, text, _) = starling(&args);
    assert!(ok && text.starts_with("500 releases") && text.contains("PLD accountant"), "{text}");
}
