//! Paged lists: `?limit=` (default 100, at most the configured page size) and `?cursor=`
//! (the `next_cursor` of the previous page: the key of its last item). Items are sorted by
//! their key; a page holds the items whose key is after the cursor.

use serde::Serialize;

use crate::error::AppError;

/// A page size from `?limit=`: default 100, 1..=`max`.
pub fn page_limit(raw: Option<&str>, max: usize) -> Result<usize, AppError> {
    match raw {
        None => Ok(100.min(max)),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(AppError::bad("limit", format!("must be a whole number from 1 to {max}"))),
        },
    }
}

/// An item of a list, with the key it is sorted and paged by.
pub struct Keyed<T> {
    pub key: String,
    pub item: T,
}

impl<T> Keyed<T> {
    pub fn new(key: impl Into<String>, item: T) -> Keyed<T> {
        Keyed { key: key.into(), item }
    }
}

/// One page of a list: `{"items": [...], "next_cursor": "..." | null}`.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The key of the last item when more follow.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// The page after `cursor` of at most `limit` items; `items` need not be sorted.
    pub fn of(mut items: Vec<Keyed<T>>, cursor: Option<&str>, limit: usize) -> Page<T> {
        items.sort_by(|a, b| a.key.cmp(&b.key));
        let mut rest: Vec<Keyed<T>> = items.into_iter().filter(|k| cursor.is_none_or(|c| k.key.as_str() > c)).collect();
        let more = rest.len() > limit;
        rest.truncate(limit);
        let next_cursor = if more { rest.last().map(|k| k.key.clone()) } else { None };
        Page { items: rest.into_iter().map(|k| k.item).collect(), next_cursor }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_limits() {
        assert_eq!(page_limit(None, 500).unwrap(), 100);
        assert_eq!(page_limit(None, 50).unwrap(), 50);
        assert_eq!(page_limit(Some("500"), 500).unwrap(), 500);
        assert!(page_limit(Some("501"), 500).is_err());
        assert!(page_limit(Some("0"), 500).is_err());
        assert!(page_limit(Some("x"), 500).is_err());
    }

    #[test]
    fn pages_follow_the_cursor_in_key_order() {
        let items = || ["c", "a", "d", "b"].map(|k| Keyed::new(k, k.to_uppercase())).into_iter().collect::<Vec<_>>();
        let first = Page::of(items(), None, 2);
        assert_eq!((first.items, first.next_cursor.as_deref()), (vec!["A".to_string(), "B".to_string()], Some("b")));
        let last = Page::of(items(), Some("b"), 2);
        assert_eq!((last.items, last.next_cursor), (vec!["C".to_string(), "D".to_string()], None));
    }
}
