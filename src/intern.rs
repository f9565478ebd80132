//! Shared copies of the label strings every request carries (tiers, modes, verdicts, months,
//! price-table keys): one `Arc<str>` per distinct text in a per-thread table, so a request
//! clones a pointer instead of allocating the text.
//!
//! Owns: `Table`, `shared`. Imports: std.

use std::cell::RefCell;
use std::sync::Arc;
use std::thread::LocalKey;

/// A per-thread table of shared labels (declare it with `thread_local!`).
pub type Table = RefCell<Vec<Arc<str>>>;

/// Distinct texts a table keeps; past this a label is allocated per call (texts from a bounded
/// set never get there).
const CAPACITY: usize = 64;

/// `text` as a shared string from `table`.
pub fn shared(table: &'static LocalKey<Table>, text: &str) -> Arc<str> {
    table.with_borrow_mut(|labels| {
        if let Some(l) = labels.iter().find(|l| ***l == *text) {
            return l.clone();
        }
        let l: Arc<str> = text.into();
        if labels.len() < CAPACITY {
            labels.push(l.clone());
        }
        l
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static T: Table = const { RefCell::new(Vec::new()) };
    }

    #[test]
    fn one_copy_per_text_up_to_the_capacity() {
        let a = shared(&T, "pro");
        assert!(Arc::ptr_eq(&a, &shared(&T, "pro")));
        assert_eq!(&*shared(&T, "free"), "free");
        for i in 0..2 * CAPACITY {
            assert_eq!(*shared(&T, &format!("m{i}")), format!("m{i}"));
        }
        assert_eq!(T.with_borrow(Vec::len), CAPACITY);
        let late = format!("m{}", 2 * CAPACITY - 1);
        assert!(!Arc::ptr_eq(&shared(&T, &late), &shared(&T, &late)), "past the capacity: a copy per call");
    }
}
