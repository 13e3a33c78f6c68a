//! Content negotiation for manifests by tag: which of the four documents a
//! tag can resolve to (Docker schema 2 manifest or manifest list, OCI
//! manifest or index) a client gets, from its `Accept` headers. Requests by
//! digest are not negotiated: a digest names exactly one document.

use axum::http::{HeaderMap, header};

use crate::oci::Format;

/// What a tag resolves to for one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub format: Format,
    /// An index (manifest list) over the architectures, not one manifest.
    pub index: bool,
}

impl Choice {
    pub fn media_type(self) -> &'static str {
        self.format.media_type(self.index)
    }
}

/// Picks the document for a client's `Accept` headers (all of them; each
/// may list several types, with q-values).
///
/// Only types the client names explicitly count: no `Accept`, `*/*` or
/// nothing known gets a Docker schema 2 manifest, which every client reads.
/// Among the named types the highest q wins; on a tie an index beats a
/// manifest when several architectures are served (`multi_arch`) and loses
/// otherwise, and `preferred` decides between Docker and OCI.
pub fn choose(headers: &HeaderMap, multi_arch: bool, preferred: Format) -> Choice {
    let accepted = accepted_types(headers);
    let q_of = |choice: Choice| {
        accepted
            .iter()
            .filter(|(media_type, _)| media_type == choice.media_type())
            .map(|(_, q)| *q)
            .fold(0.0f32, f32::max)
    };
    let rank = |choice: Choice| (q_of(choice), choice.index == multi_arch, choice.format == preferred);
    [Format::Docker, Format::Oci]
        .into_iter()
        .flat_map(|format| [false, true].map(|index| Choice { format, index }))
        .filter(|&choice| q_of(choice) > 0.0)
        .max_by(|&a, &b| rank(a).partial_cmp(&rank(b)).expect("q-values are numbers"))
        .unwrap_or(Choice {
            format: Format::Docker,
            index: false,
        })
}

/// Every media type in the `Accept` headers with its q-value (1 when not given).
fn accepted_types(headers: &HeaderMap) -> Vec<(String, f32)> {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|item| {
            let mut parts = item.split(';');
            let media_type = parts.next()?.trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|param| param.split_once('='))
                .find(|(key, _)| key.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, value)| value.trim().parse::<f32>().ok())?;
            (!media_type.is_empty() && q.is_finite()).then_some((media_type, q))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci;
    use axum::http::HeaderValue;

    fn accept(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(header::ACCEPT, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn pick(values: &[&str], multi_arch: bool) -> &'static str {
        choose(&accept(values), multi_arch, Format::Oci).media_type()
    }

    const DOCKER_CLIENT: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";
    /// What containerd sends.
    const EVERYTHING: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";

    #[test]
    fn no_accept_or_wildcards_get_docker_schema_2() {
        for values in [&[][..], &["*/*"], &["application/json"], &["text/html, application/*"]] {
            assert_eq!(pick(values, false), oci::DOCKER_MANIFEST, "{values:?}");
            assert_eq!(pick(values, true), oci::DOCKER_MANIFEST, "{values:?}");
        }
    }

    #[test]
    fn one_architecture_gets_a_manifest() {
        assert_eq!(pick(&[EVERYTHING], false), oci::OCI_MANIFEST);
        assert_eq!(pick(&[oci::DOCKER_MANIFEST], false), oci::DOCKER_MANIFEST);
        assert_eq!(pick(&[DOCKER_CLIENT], false), oci::DOCKER_MANIFEST);
        assert_eq!(pick(&[oci::OCI_MANIFEST], false), oci::OCI_MANIFEST);
        assert_eq!(
            pick(&[oci::OCI_INDEX], false),
            oci::OCI_INDEX,
            "an index is all it reads"
        );
        let docker_first = choose(&accept(&[EVERYTHING]), false, Format::Docker);
        assert_eq!(docker_first.media_type(), oci::DOCKER_MANIFEST);
    }

    #[test]
    fn several_architectures_get_an_index_when_accepted() {
        assert_eq!(pick(&[EVERYTHING], true), oci::OCI_INDEX);
        assert_eq!(pick(&[DOCKER_CLIENT], true), oci::DOCKER_MANIFEST_LIST);
        assert_eq!(pick(&[oci::OCI_MANIFEST], true), oci::OCI_MANIFEST);
        assert_eq!(pick(&[oci::DOCKER_MANIFEST], true), oci::DOCKER_MANIFEST);
    }

    #[test]
    fn separate_headers_and_q_values_count() {
        let lines = [oci::OCI_MANIFEST, oci::DOCKER_MANIFEST_LIST, oci::DOCKER_MANIFEST];
        assert_eq!(pick(&lines, true), oci::DOCKER_MANIFEST_LIST);
        let q = format!("{}; q=0.5, {};q=0.9", oci::OCI_MANIFEST, oci::DOCKER_MANIFEST);
        assert_eq!(pick(&[&q], false), oci::DOCKER_MANIFEST);
        let refused = format!("{};q=0, {}", oci::OCI_MANIFEST, oci::DOCKER_MANIFEST);
        assert_eq!(pick(&[&refused], false), oci::DOCKER_MANIFEST);
        let garbage = format!(
            "{};q=lots, {};Q=1",
            oci::OCI_MANIFEST,
            oci::DOCKER_MANIFEST.to_uppercase()
        );
        assert_eq!(pick(&[&garbage], false), oci::DOCKER_MANIFEST);
    }
}
