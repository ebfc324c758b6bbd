//! Choosing balancers: globs over names and chains, namespaces, exclusions.

use crate::balance::{Balancer, Candidate};
use crate::cli::SelectArgs;
use crate::error::Result;

/// The usage error of a command whose selection (`--balancer`, `--namespace`,
/// `--exclude`) matches no balancer.
pub const NONE_MATCHED: &str = "no balancer matches the selection (--balancer, --namespace, --exclude); `lbaudit report` lists them";

/// Does `text` match the glob `pat` (`*` any run, `?` one character)?
pub fn glob(pat: &str, text: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matcher with backtracking to the last `*`: linear in practice, no recursion.
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A compiled selection.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    include: Vec<String>,
    namespaces: Vec<String>,
    exclude: Vec<String>,
}

impl Selection {
    pub fn new(a: &SelectArgs) -> Result<Self> {
        Ok(Self {
            include: a.balancer.clone(),
            namespaces: a.namespace.clone(),
            exclude: a.exclude.clone(),
        })
    }

    /// Is any filter given?
    pub fn is_filtered(&self) -> bool {
        !(self.include.is_empty() && self.namespaces.is_empty() && self.exclude.is_empty())
    }

    pub fn matches(&self, b: &Balancer) -> bool {
        self.matches_parts(&b.name, &b.chain, || b.namespace())
    }

    /// [`Selection::matches`] for the balancer a candidate would be.
    pub fn matches_candidate(&self, c: &Candidate) -> bool {
        self.matches_parts(&c.name, c.chain_name, || c.namespace())
    }

    /// (The namespace is looked for only when namespaces are asked for.)
    fn matches_parts<'n>(
        &self,
        name: &str,
        chain: &str,
        namespace: impl FnOnce() -> Option<&'n str>,
    ) -> bool {
        let hit = |g: &String| glob(g, name) || glob(g, chain);
        (self.include.is_empty() || self.include.iter().any(hit))
            && (self.namespaces.is_empty()
                || namespace().is_some_and(|ns| self.namespaces.iter().any(|n| n == ns)))
            && !self.exclude.iter().any(hit)
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs() {
        assert!(glob("*", "anything"));
        assert!(glob("kube-system/*", "kube-system/kube-dns:dns"));
        assert!(!glob("kube-system/*", "default/kubernetes:https"));
        assert!(glob("KUBE-SVC-?BC*", "KUBE-SVC-ABCDEF"));
        assert!(glob("*dns*", "kube-system/kube-dns:dns-tcp"));
        assert!(!glob("a*b", "acbx"));
        assert!(glob("", ""));
        assert!(!glob("", "x"));
    }
}
