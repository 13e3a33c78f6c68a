//! What a requested package's `meta` may say in the documents, whatever
//! the package set wrote there: its licenses as valid SPDX license
//! expressions and its homepage as a web URL.
//!
//! Each `spdxId` of `meta.license` is parsed with the `spdx` crate (its
//! copy of the SPDX License List; deprecated identifiers count, as SPDX 2.3
//! and CycloneDX still accept them) and written back in a canonical form.
//! One that is not a valid expression becomes `LicenseRef-<its text>`,
//! every character but `[A-Za-z0-9.-]` a `-`, at most 64 of them: the
//! documents still say a license was named, and nothing of the text but
//! those characters reaches them. (`NOASSERTION` would drop the valid ones
//! beside it too.) `DocumentRef-` and `AdditionRef-` count as invalid: the
//! documents refer to no other document, and SPDX 2.3 has no additions.
//! Identifiers newer than a validator's own copy of the list (this one is
//! the crate's, [`spdx::license_version`]) are still unknown to it.
//!
//! A homepage reaches the documents only as an absolute `http` or `https`
//! URL, as the `url` crate serialises it (percent-encoded); any other is
//! left out.

use spdx::expression::{ExprNode, Operator};
use spdx::{AdditionItem, Expression, LicenseId, LicenseItem, LicenseReq, ParseMode};

/// How SPDX parses here: strictly, but with deprecated identifiers.
const MODE: ParseMode = ParseMode {
    allow_deprecated: true,
    ..ParseMode::STRICT
};

/// The longest `LicenseRef-` idstring made from an invalid identifier.
const LONGEST_REFERENCE: usize = 64;

/// What the documents say of a `LicenseRef-`'s text.
pub const REFERENCE_TEXT: &str = "Named by the package set's meta.license; its text is not known here.";

/// One `spdxId` of a package's `meta.license`, as the documents may state it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum License {
    /// One identifier on the SPDX License List.
    Listed(&'static str),
    /// Any other valid expression (compound, `WITH` an exception, `+`, a
    /// `LicenseRef-`), canonical, and the `LicenseRef-`s it names.
    Expression { text: String, references: Vec<String> },
    /// What is not a valid expression, as a `LicenseRef-` of its text.
    Unknown(String),
}

impl License {
    /// Reads one identifier; `None` for a blank one, which names nothing.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        Some(
            match Expression::parse_mode(text, MODE).ok().and_then(|e| canonical(&e)) {
                Some((canonical, references)) => match spdx::license_id(&canonical).filter(|id| id.name == canonical) {
                    Some(id) if references.is_empty() => License::Listed(id.name),
                    _ => License::Expression {
                        text: canonical,
                        references,
                    },
                },
                None => License::Unknown(reference(text)),
            },
        )
    }

    /// Its SPDX expression.
    pub fn text(&self) -> &str {
        match self {
            License::Listed(id) => id,
            License::Expression { text, .. } | License::Unknown(text) => text,
        }
    }

    /// Whether it combines licenses (`AND`, `OR`), so it needs parentheses
    /// among others.
    fn is_compound(&self) -> bool {
        matches!(self, License::Expression { text, .. } if text.contains(" AND ") || text.contains(" OR "))
    }

    /// The `LicenseRef-`s it names.
    fn references(&self) -> &[String] {
        match self {
            License::Listed(_) => &[],
            License::Expression { references, .. } => references,
            License::Unknown(reference) => std::slice::from_ref(reference),
        }
    }
}

/// A package's licenses (all of them apply).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Licenses(pub Vec<License>);

impl Licenses {
    /// Reads the `spdxId`s of a package's `meta.license`.
    pub fn parse(texts: &[String]) -> Self {
        Licenses(texts.iter().filter_map(|text| License::parse(text)).collect())
    }

    /// The one expression of them all (joined with `AND`); `None` without any.
    pub fn expression(&self) -> Option<String> {
        let parts: Vec<String> = (self.0.iter())
            .map(|license| match license.is_compound() && self.0.len() > 1 {
                true => format!("({})", license.text()),
                false => license.text().to_owned(),
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join(" AND "))
    }

    /// Whether CycloneDX must state them as one expression: any is a
    /// valid expression other than one listed identifier.
    pub fn need_expression(&self) -> bool {
        self.0
            .iter()
            .any(|license| matches!(license, License::Expression { .. }))
    }

    /// The `LicenseRef-`s they name.
    pub fn references(&self) -> impl Iterator<Item = &str> {
        self.0.iter().flat_map(License::references).map(String::as_str)
    }
}

/// A valid expression written back from its parse (upper-case operators,
/// parentheses only where needed), and its `LicenseRef-`s; `None` when it
/// names what these documents cannot hold.
fn canonical(expression: &Expression) -> Option<(String, Vec<String>)> {
    let mut stack: Vec<(String, Option<Operator>)> = Vec::new();
    let mut references = Vec::new();
    for node in expression.iter() {
        match node {
            ExprNode::Req(requirement) => {
                references.extend(license_ref(&requirement.req));
                stack.push((requirement_text(&requirement.req)?, None));
            }
            ExprNode::Op(operator) => {
                let right = stack.pop()?;
                let left = stack.pop()?;
                // AND binds tighter than OR: an OR inside an AND is wrapped.
                let wrap = |(text, inner): (String, Option<Operator>)| match (operator, inner) {
                    (Operator::And, Some(Operator::Or)) => format!("({text})"),
                    _ => text,
                };
                let word = match operator {
                    Operator::And => "AND",
                    Operator::Or => "OR",
                };
                stack.push((format!("{} {word} {}", wrap(left), wrap(right)), Some(*operator)));
            }
        }
    }
    let (text, _) = stack.pop().filter(|_| stack.is_empty())?;
    references.sort();
    references.dedup();
    Some((text, references))
}

/// One requirement's text, if SPDX 2.3 documents of their own can hold it.
fn requirement_text(requirement: &LicenseReq) -> Option<String> {
    let license_ok = match &requirement.license {
        LicenseItem::Spdx { id, .. } => listed(*id),
        LicenseItem::Other(other) => other.doc_ref.is_none(),
    };
    let addition_ok = !matches!(requirement.addition, Some(AdditionItem::Other(_)));
    (license_ok && addition_ok).then(|| requirement.to_string())
}

/// The `LicenseRef-` a requirement names.
fn license_ref(requirement: &LicenseReq) -> Option<String> {
    match &requirement.license {
        LicenseItem::Other(other) => Some(format!("LicenseRef-{}", other.lic_ref)),
        LicenseItem::Spdx { .. } => None,
    }
}

/// Whether the crate's identifier is on the SPDX License List: the crate
/// also lists `NOASSERTION`, and GNU names without `-only` or `-or-later`
/// that the list never had (`GFDL-1.3-invariants`), for its own parsing.
fn listed(id: LicenseId) -> bool {
    let bare_gnu = id.is_gnu() && !id.is_deprecated() && !id.name.ends_with("-only") && !id.name.ends_with("-or-later");
    id.name != "NOASSERTION" && !bare_gnu
}

/// `LicenseRef-` and `text` with every character SPDX's idstring does not
/// allow made a `-`, shortened to [`LONGEST_REFERENCE`].
fn reference(text: &str) -> String {
    let idstring: String = (text.chars())
        .take(LONGEST_REFERENCE)
        .map(|c| match c.is_ascii_alphanumeric() || c == '.' || c == '-' {
            true => c,
            false => '-',
        })
        .collect();
    format!("LicenseRef-{idstring}")
}

/// A homepage the documents may link: an absolute `http` or `https` URL,
/// serialised (so percent-encoded); `None` for anything else.
pub fn homepage(text: &str) -> Option<String> {
    let url = url::Url::parse(text).ok()?;
    let web = matches!(url.scheme(), "http" | "https") && url.host().is_some();
    web.then(|| url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> License {
        License::parse(text).unwrap()
    }

    #[test]
    fn listed_identifiers_pass_as_they_are() {
        assert_eq!(parse("GPL-3.0-or-later"), License::Listed("GPL-3.0-or-later"));
        assert_eq!(parse(" MIT "), License::Listed("MIT"));
        assert_eq!(parse("GPL-2.0"), License::Listed("GPL-2.0"), "deprecated, still listed");
        assert_eq!(License::parse("  "), None, "a blank names nothing");
    }

    #[test]
    fn valid_expressions_are_written_canonically() {
        let text = |input: &str| parse(input).text().to_owned();
        assert_eq!(text("MIT or Apache-2.0"), "MIT OR Apache-2.0");
        assert_eq!(
            text("(MIT)  AND\n(ISC OR BSD-3-Clause)"),
            "MIT AND (ISC OR BSD-3-Clause)"
        );
        assert_eq!(text("MIT AND ISC OR Zlib"), "MIT AND ISC OR Zlib");
        assert_eq!(text("Apache-2.0 WITH LLVM-exception"), "Apache-2.0 WITH LLVM-exception");
        assert_eq!(
            parse("LicenseRef-Acme OR MIT"),
            License::Expression {
                text: "LicenseRef-Acme OR MIT".into(),
                references: vec!["LicenseRef-Acme".into()],
            }
        );
    }

    #[test]
    fn anything_else_becomes_a_sanitised_license_ref() {
        let unknown = |input: &str| match parse(input) {
            License::Unknown(reference) => reference,
            other => panic!("{input:?} read as {other:?}"),
        };
        assert_eq!(unknown("MIT OR <script>"), "LicenseRef-MIT-OR--script-");
        assert_eq!(unknown(r#"{"spdxId":"MIT"}"#), "LicenseRef---spdxId---MIT--");
        assert_eq!(unknown("mit"), "LicenseRef-mit", "identifiers are case-sensitive");
        assert_eq!(unknown("NOASSERTION"), "LicenseRef-NOASSERTION");
        assert_eq!(unknown("GFDL-1.3-invariants"), "LicenseRef-GFDL-1.3-invariants");
        assert_eq!(
            unknown("DocumentRef-x:LicenseRef-y"),
            "LicenseRef-DocumentRef-x-LicenseRef-y"
        );
        assert_eq!(unknown("MIT WITH AdditionRef-x"), "LicenseRef-MIT-WITH-AdditionRef-x");
        assert_eq!(unknown("Ünïcode"), "LicenseRef--n-code");
        let long = unknown(&"x".repeat(1000));
        assert_eq!(long.len(), "LicenseRef-".len() + LONGEST_REFERENCE);
    }

    #[test]
    fn licenses_join_into_one_expression_with_their_references() {
        let texts = ["GPL-2.0-only", "MIT OR ISC", "<b>", "LicenseRef-Acme"].map(String::from);
        let licenses = Licenses::parse(&texts);
        assert_eq!(
            licenses.expression().unwrap(),
            "GPL-2.0-only AND (MIT OR ISC) AND LicenseRef--b- AND LicenseRef-Acme"
        );
        assert!(licenses.need_expression());
        assert_eq!(
            licenses.references().collect::<Vec<_>>(),
            ["LicenseRef--b-", "LicenseRef-Acme"]
        );
        let plain = Licenses::parse(&["GPL-2.0-only".into(), "LGPL-2.1-or-later".into()]);
        assert_eq!(plain.expression().unwrap(), "GPL-2.0-only AND LGPL-2.1-or-later");
        assert!(!plain.need_expression());
        assert_eq!(
            Licenses::parse(&["MIT OR ISC".into()]).expression().unwrap(),
            "MIT OR ISC"
        );
        assert_eq!(Licenses::parse(&[]).expression(), None);
    }

    #[test]
    fn only_web_homepages_pass() {
        assert_eq!(
            homepage("https://www.gnu.org/software/hello/manual/").as_deref(),
            Some("https://www.gnu.org/software/hello/manual/")
        );
        assert_eq!(
            homepage("http://example.org/<script>\"x\"").as_deref(),
            Some("http://example.org/%3Cscript%3E%22x%22")
        );
        for hostile in [
            "javascript:alert(1)",
            "JavaScript:alert(1)",
            "data:text/html,<script>alert(1)</script>",
            "file:///etc/passwd",
            "//example.org/relative",
            "www.example.org",
            "<a href=\"https://example.org\">x</a>",
            "{\"url\":\"https://example.org\"}",
            "",
        ] {
            assert_eq!(homepage(hostile), None, "{hostile:?}");
        }
    }
}
