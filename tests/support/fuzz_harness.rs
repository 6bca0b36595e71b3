//! What the property tests of the network-facing adapters share (included with `#[path]` by
//! apiserver/tests/fuzz.rs and webhook/tests/fuzz.rs): a reproducible proptest config and a
//! panic counter that also sees panics tokio or axum would swallow.

use std::cell::Cell;
use std::sync::Once;

use proptest::test_runner::{Config, RngSeed};

/// Same inputs on every run unless `PROPTEST_RNG_SEED` says otherwise (`seed` is the
/// default); `PROPTEST_CASES` overrides `cases`. Failures are printed (minimal input
/// included), not written into the source tree.
pub fn config(cases: u32, seed: u64) -> Config {
    let mut config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    if config.rng_seed == RngSeed::Random {
        config.rng_seed = RngSeed::Fixed(seed);
    }
    config
}

thread_local! {
    /// Panics on this thread, counted by the hook: the tasks of a current-thread runtime run
    /// here too, so a panic that tokio or axum would swallow still counts.
    static PANICS: Cell<usize> = const { Cell::new(0) };
}

/// Installs the counting panic hook (once per process; the previous hook still prints).
pub fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|p| p.set(p.get() + 1));
            previous(info);
        }));
    });
}

pub fn reset_panics() {
    PANICS.with(|p| p.set(0));
}

/// Panics on this thread since the last [`reset_panics`].
pub fn panics() -> usize {
    PANICS.with(Cell::get)
}
