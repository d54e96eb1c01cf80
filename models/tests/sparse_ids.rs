//! A ratings file with sparse ids (as the larger MovieLens releases have) evaluates exactly like
//! the same data with dense ids: the loader remaps ids, so evaluation negatives are real items.

use starling_models::data::synthetic::{Population, SyntheticConfig};
use starling_models::data::{LeaveOneOut, movielens};
use starling_models::eval::EvalSet;
use std::fmt::Write as _;
use std::path::Path;

fn popularity_hr(r: &movielens::Ratings) -> f64 {
    let split = LeaveOneOut::split(&r.interactions, r.n_users, r.n_items);
    let counts = split.item_counts();
    let eval = EvalSet::build(&split).unwrap();
    eval.evaluate(|_, items, out| out.extend(items.iter().map(|&i| counts[i as usize] as f32))).hr_at_10
}

#[test]
fn sparse_csv_ids_are_remapped_and_the_popularity_baseline_stays_honest() {
    let population = Population::new(SyntheticConfig {
        users: 200,
        items: 400,
        seed: 3,
        max_interactions: 100,
        ..SyntheticConfig::default()
    })
    .unwrap();
    let interactions = population.interactions(200);
    let (mut dense, mut sparse) = (String::new(), String::from("userId,movieId,rating,timestamp\n"));
    for x in &interactions {
        let _ = writeln!(dense, "{}\t{}\t{}\t{}", x.user + 1, x.item + 1, x.rating, x.timestamp);
        // Ids spread out the way ml-latest's movieIds are (most ids never occur).
        let _ = writeln!(sparse, "{},{},{},{}", x.user * 7 + 3, x.item * 1000 + 17, x.rating, x.timestamp);
    }
    let d = movielens::parse(dense.as_bytes(), Path::new("u.data")).unwrap();
    let s = movielens::parse(sparse.as_bytes(), Path::new("ratings.csv")).unwrap();
    assert_eq!((s.n_users, s.n_items), (d.n_users, d.n_items), "only ids that occur are items");
    assert!(s.n_items < 400_000);
    let (hd, hs) = (popularity_hr(&d), popularity_hr(&s));
    assert_eq!(hd, hs, "same data, same evaluation, whatever the ids");
    assert!(hs < 0.9, "the popularity baseline does not score a trivial {hs}");
}
