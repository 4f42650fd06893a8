//! The route table: the first route in file order that matches a method
//! and a canonical path, found without trying every route.
//!
//! Exact paths and prefixes are hashed. A path is looked up as itself, as
//! itself without one trailing slash (exact routes also match that), and,
//! for prefixes, cut at each length some prefix route has and where the
//! path has a segment boundary. Of the routes found, the lowest index whose
//! methods allow the request wins: first match wins, as in a linear scan
//! (a property test holds the two together). The work per request grows
//! with the number of distinct prefix lengths, not with the number of
//! routes.

use std::collections::HashMap;

use crate::config::{PathPattern, Route};

type Map = HashMap<String, Vec<usize>, ahash::RandomState>;

#[derive(Debug, Default)]
pub struct RouteTable {
    /// Exact path → indices of the routes with it, ascending.
    exact: Map,
    /// Prefix (without its `/*`) → indices of the routes with it, ascending.
    prefix: Map,
    /// Every length a prefix has, ascending.
    prefix_lens: Vec<usize>,
}

impl RouteTable {
    pub fn new(routes: &[Route]) -> RouteTable {
        let mut table = RouteTable::default();
        for (i, route) in routes.iter().enumerate() {
            match &route.path {
                PathPattern::Exact(p) => table.exact.entry(p.clone()).or_default().push(i),
                PathPattern::Prefix(p) => {
                    table.prefix.entry(p.clone()).or_default().push(i);
                    table.prefix_lens.push(p.len());
                }
            }
        }
        table.prefix_lens.sort_unstable();
        table.prefix_lens.dedup();
        table
    }

    /// The index of the first route of `routes` (the ones this table was
    /// built from) that matches.
    pub fn find(&self, routes: &[Route], method: &http::Method, path: &str) -> Option<usize> {
        let mut best: Option<usize> = None;
        self.candidates(path, |candidates| {
            for &i in candidates {
                if best.is_some_and(|b| b <= i) {
                    return;
                }
                if routes[i].allows(method) {
                    best = Some(i);
                    return;
                }
            }
        });
        best
    }

    /// The methods some route takes on `path`, for a 405's `Allow` (`HEAD`
    /// beside `GET`); empty when no route has this path at all.
    pub fn allowed(&self, routes: &[Route], path: &str) -> Vec<http::Method> {
        let mut methods: Vec<http::Method> = Vec::new();
        self.candidates(path, |candidates| {
            for &i in candidates {
                for m in routes[i].methods.iter().flatten() {
                    if !methods.contains(m) {
                        methods.push(m.clone());
                    }
                }
            }
        });
        if methods.contains(&http::Method::GET) && !methods.contains(&http::Method::HEAD) {
            methods.push(http::Method::HEAD);
        }
        methods.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        methods
    }

    /// Hands `each` the routes whose path matches `path`, group by group
    /// (each ascending): the exact ones, then per prefix length.
    fn candidates(&self, path: &str, mut each: impl FnMut(&[usize])) {
        if let Some(found) = self.exact.get(path) {
            each(found);
        }
        if let Some(found) = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .and_then(|bare| self.exact.get(bare))
        {
            each(found);
        }
        for &len in &self.prefix_lens {
            let (Some(head), Some(rest)) = (path.get(..len), path.get(len..)) else {
                continue;
            };
            if rest.is_empty() || rest.starts_with('/') || head.ends_with('/') {
                if let Some(found) = self.prefix.get(head) {
                    each(found);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Amount;

    fn route(i: usize, path: PathPattern, methods: Option<Vec<http::Method>>) -> Route {
        Route {
            name: format!("r{i}"),
            methods,
            path,
            upstream: "main".into(),
            upstream_index: 0,
            feature: None,
            cost: Amount::Fixed(1),
            pools: Vec::new(),
            meter: Vec::new(),
            refund_on_5xx: false,
            auth: true,
            forward_key: false,
            allow_encoded_slashes: false,
        }
    }

    fn linear(routes: &[Route], method: &http::Method, path: &str) -> Option<usize> {
        routes.iter().position(|r| r.matches(method, path))
    }

    proptest::proptest! {
        /// The table finds exactly what trying every route in order finds.
        #[test]
        fn the_table_agrees_with_a_linear_scan(
            specs in proptest::collection::vec(
                ("(/(a|b|c|ab)){0,3}/?", proptest::bool::ANY, 0..3usize),
                0..12,
            ),
            paths in proptest::collection::vec("(/(a|b|c|ab|)){0,4}", 1..20),
        ) {
            let methods = [http::Method::GET, http::Method::POST];
            let routes: Vec<Route> = specs
                .iter()
                .enumerate()
                .map(|(i, (p, prefix, m))| {
                    let p = if p.is_empty() { "/".to_string() } else { p.clone() };
                    let pattern = if *prefix { PathPattern::Prefix(p) } else { PathPattern::Exact(p) };
                    let allowed = match m {
                        0 => None,
                        1 => Some(vec![http::Method::GET]),
                        _ => Some(vec![http::Method::POST]),
                    };
                    route(i, pattern, allowed)
                })
                .collect();
            let table = RouteTable::new(&routes);
            for path in &paths {
                let path = if path.is_empty() { "/" } else { path.as_str() };
                for method in &methods {
                    proptest::prop_assert_eq!(
                        table.find(&routes, method, path),
                        linear(&routes, method, path),
                        "{} {}", method, path
                    );
                }
            }
        }
    }
}
