//! Why an item is recommended: a [`Reason`] per recommended item, computed on the device from
//! the user's positive events, the request's context and the global model only.

use serde::{Deserialize, Serialize};
use starling_models::data::events::{Context, Examples};
use starling_models::family::{Family, ModelDef, Query};
use starling_models::mf;

/// The smallest cosine similarity between a recommended item's embedding and one of the user's
/// positive items' for the recommendation to be explained by that item
/// ([`Reason::BecauseYouEngagedWith`]).
pub const SIMILARITY_THRESHOLD: f32 = 0.5;

/// What explanations are computed from (named in the privacy report and the export). Nothing of it
/// leaves the device.
pub const EXPLANATION_INPUTS: &[&str] = &[
    "your positive events (the items you engaged with positively, and when)",
    "the request's context (time of day, weekday, device class), when the app passes one",
    "the global model (item embeddings shared by all users) and your private vector",
];

/// Why an item is recommended, for the app to show. Serialised with a snake_case `type` tag,
/// e.g. `{"type":"because_you_engaged_with","item":12,"similarity":0.81}`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reason {
    /// Similar to `item`, one of the user's own positive items: the one whose global embedding is
    /// the most similar (cosine `similarity` ≥ [`SIMILARITY_THRESHOLD`]) to the recommended
    /// item's. Never an item the user skipped, rated low or only glanced at.
    BecauseYouEngagedWith {
        /// The user's positive item.
        item: u32,
        /// Cosine similarity of the two items' embeddings.
        similarity: f32,
    },
    /// The request's context put it there ("at this time of day / on this device"): with the
    /// context the item is in the top k, without it (the model's average context) it would not be.
    /// Only context-aware families (two-tower) give it.
    InThisContext {
        /// The request's context.
        context: Context,
    },
    /// A personal recommendation unrelated to anything in the user's history (no positive item's
    /// embedding is similar enough).
    NewForYou,
    /// The global model's non-personal ranking (what is popular across users now).
    PopularNow,
    /// The catalogue order: the device has no global model yet.
    Catalogue,
}

/// The user's positive items, most recent last (ties by item), and the items to leave out of
/// lists: the positive items and the items with only negative signals (skipped, rated low),
/// sorted.
pub(super) fn history_and_excluded(examples: &Examples) -> (Vec<u32>, Vec<u32>) {
    let mut by_time: Vec<(i64, u32)> = examples.positives.iter().map(|p| (p.last_ms, p.item)).collect();
    by_time.sort_unstable();
    let history = by_time.into_iter().map(|(_, item)| item).collect();
    let mut excluded: Vec<u32> =
        examples.positives.iter().map(|p| p.item).chain(examples.negatives.iter().copied()).collect();
    excluded.sort_unstable();
    excluded.dedup();
    (history, excluded)
}

/// The reason of each item of a personal list `top` (the `top.len()` best items for `history`
/// and `context`, leaving out `excluded`).
pub(super) fn personal(
    def: &ModelDef,
    global: &[f32],
    private: &[f32],
    history: &[u32],
    context: Option<Context>,
    top: &[(u32, f32)],
    excluded: &[u32],
) -> Vec<Reason> {
    // Items in the list only because of the context: not in the top k at the average context.
    let mut without_context: Option<Vec<u32>> = None;
    if let (Some(_), Family::TwoTower { .. }) = (context, def.family) {
        let mut base = Vec::with_capacity(def.items as usize);
        def.score_all(global, private, &Query { history, context: None }, &mut base);
        if base.len() == def.items as usize && base.iter().all(|s| s.is_finite()) {
            let mut items: Vec<u32> =
                mf::top_k(&base, top.len(), excluded).into_iter().map(|x| x.0).collect();
            items.sort_unstable();
            without_context = Some(items);
        }
    }
    // The user's positive items' unit embeddings.
    let unit = |v: &[f32]| -> Option<Vec<f32>> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        (n.is_finite() && n > 0.0).then(|| v.iter().map(|x| x / n).collect())
    };
    let mut own: Vec<(u32, Vec<f32>)> =
        history.iter().filter_map(|&i| Some((i, unit(def.item_vector(global, i)?)?))).collect();
    own.sort_unstable_by_key(|x| x.0);
    top.iter()
        .map(|&(item, _)| {
            if let (Some(context), Some(without)) = (context, &without_context)
                && without.binary_search(&item).is_err()
            {
                return Reason::InThisContext { context };
            }
            let Some(v) = def.item_vector(global, item).and_then(unit) else {
                return Reason::NewForYou;
            };
            let best = own
                .iter()
                .filter(|(i, _)| *i != item)
                .map(|(i, u)| (*i, u.iter().zip(&v).map(|(a, b)| a * b).sum::<f32>()))
                .filter(|(_, s)| s.is_finite())
                .fold(None, |best: Option<(u32, f32)>, (i, s)| match best {
                    Some((_, b)) if b >= s => best,
                    _ => Some((i, s)),
                });
            match best {
                Some((item, similarity)) if similarity >= SIMILARITY_THRESHOLD => {
                    Reason::BecauseYouEngagedWith { item, similarity }
                }
                _ => Reason::NewForYou,
            }
        })
        .collect()
}
