//! Tests against MovieLens-100K when `../shared/data/ml-100k/u.data` is present (skipped with a
//! printed reason otherwise).

use sha2::{Digest, Sha256};
use starling_models::data::{LeaveOneOut, movielens};
use starling_models::eval::EvalSet;
use std::path::PathBuf;

fn data_path() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/ml-100k/u.data");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipped: {} not found (MovieLens-100K is not part of the repository)", p.display());
        None
    }
}

#[test]
fn reference_split_and_evaluation_set_match_the_published_figures() {
    let Some(path) = data_path() else { return };
    let r = movielens::load(&path).unwrap();
    assert_eq!((r.n_users, r.n_items, r.interactions.len()), (943, 1682, 100_000));
    let split = LeaveOneOut::split(&r.interactions, r.n_users, r.n_items);
    assert_eq!(split.train_pairs(), 99_057);
    let set = EvalSet::build(&split).unwrap();
    assert_eq!(set.cases.len(), 943);
    let export = set.export();
    let digest = Sha256::digest(export.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, "5caf8c983d83011adebc1d25dc790064fc1e4d324aa33eaf06203a66528f121b");
}

#[test]
fn centralized_mf_reaches_the_reference_quality() {
    use starling_models::burn_mf::{CentralTraining, train_central};
    let Some(path) = data_path() else { return };
    let r = movielens::load(&path).unwrap();
    let split = LeaveOneOut::split(&r.interactions, r.n_users, r.n_items);
    let eval = EvalSet::build(&split).unwrap();
    let mut last = None;
    train_central(&split, &eval, 32, &CentralTraining::default(), |e| last = Some(e.metrics));
    let m = last.unwrap();
    assert!(m.hr_at_10 >= 0.58, "HR@10 {:.4} NDCG@10 {:.4}", m.hr_at_10, m.ndcg_at_10);
}
