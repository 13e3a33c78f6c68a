//! Signatures of manifests in the format cosign writes and containers/image
//! (skopeo, podman) verifies as "sigstore attachments": a simple-signing
//! payload naming the image and its manifest digest, signed with ECDSA
//! P-256 over SHA-256, as the one layer of a manifest at the tag
//! `sha256-<hex>.sig`, the signature in the layer's annotation. Signatures
//! are deterministic (RFC 6979), so every replica signs alike. The key is
//! read once, at start, from a file of at most 64 KiB; a file its group or
//! others may read is warned about. The provenance is signed too, as a
//! DSSE envelope (the form in-toto attestations take).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};

use crate::digest::Digest;

/// The media type of a simple-signing payload, and the annotation that
/// holds its signature.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The artifact type of a signature among an image's referrers, as cosign
/// gives it.
pub const SIGNATURE_ARTIFACT: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// The media type of a DSSE envelope.
pub const DSSE_ENVELOPE: &str = "application/vnd.dsse.envelope.v1+json";

/// The largest key file read: a PEM P-256 key is a few hundred bytes.
const MAX_KEY_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("cannot read the signing key {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the signing key {path} is larger than {} KiB: not a PEM P-256 key", MAX_KEY_BYTES / 1024)]
    TooLarge { path: PathBuf },
    #[error(
        "the signing key {path} is not a PEM ECDSA P-256 private key (PKCS#8 \"PRIVATE KEY\" or SEC1 \"EC PRIVATE KEY\"; for example from `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`)"
    )]
    NotAKey { path: PathBuf },
}

/// A loaded signing key.
pub struct Signer {
    key: SigningKey,
    public_pem: String,
    key_id: String,
    file: KeyFile,
}

/// Where the key was read from, and the file's permission bits then.
struct KeyFile {
    path: PathBuf,
    mode: u32,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("public_pem", &self.public_pem)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Reads a PEM P-256 private key (PKCS#8 or SEC1).
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        let (pem, mode) = read_key_file(path)?;
        let secret = p256::SecretKey::from_pkcs8_pem(&pem)
            .or_else(|_| p256::SecretKey::from_sec1_pem(&pem))
            .map_err(|_| SigningError::NotAKey { path: path.to_owned() })?;
        let not_a_key = || SigningError::NotAKey { path: path.to_owned() };
        let public = secret.public_key();
        let public_pem = public.to_public_key_pem(LineEnding::LF).map_err(|_| not_a_key())?;
        let public_der = public.to_public_key_der().map_err(|_| not_a_key())?;
        Ok(Signer {
            key: SigningKey::from(secret),
            public_pem,
            key_id: Digest::of(public_der.as_bytes()).hex().to_owned(),
            file: KeyFile {
                path: path.to_owned(),
                mode,
            },
        })
    }

    /// Logs a warning when the key's file was readable (or writable) by its
    /// group or others. Called once logging is set up.
    pub fn warn_if_exposed(&self) {
        let KeyFile { path, mode } = &self.file;
        if mode & 0o077 != 0 {
            tracing::warn!(
                key = %path.display(),
                mode = %format_args!("{:o}", mode & 0o777),
                "the signing key's file is open to its group or others: `chmod 600` it"
            );
        }
    }

    /// The public key, PEM (SubjectPublicKeyInfo), as cosign and
    /// containers/image read it.
    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    /// The SHA-256 (hex) of the public key's DER: what tells keys apart.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The base64 of the DER signature of `payload`.
    pub fn sign(&self, payload: &[u8]) -> String {
        let signature: Signature = self.key.sign(payload);
        base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
    }

    /// A DSSE envelope of `payload` (of `payload_type`), signed over its
    /// pre-authentication encoding, with no key id (as cosign writes it).
    pub fn envelope(&self, payload_type: &str, payload: &[u8]) -> Vec<u8> {
        let base64 = &base64::engine::general_purpose::STANDARD;
        let envelope = serde_json::json!({
            "payloadType": payload_type,
            "payload": base64.encode(payload),
            "signatures": [{ "keyid": "", "sig": self.sign(&pae(payload_type, payload)) }],
        });
        serde_json::to_vec(&envelope).expect("envelopes serialise")
    }

    /// Whether `envelope` is a DSSE envelope this key signed.
    pub fn signed_envelope(&self, envelope: &[u8]) -> bool {
        let base64 = &base64::engine::general_purpose::STANDARD;
        let Ok(envelope) = serde_json::from_slice::<serde_json::Value>(envelope) else {
            return false;
        };
        let text = |value: &serde_json::Value| value.as_str().map(str::to_owned);
        let (Some(payload_type), Some(payload), Some(sig)) = (
            text(&envelope["payloadType"]),
            text(&envelope["payload"]).and_then(|p| base64.decode(p).ok()),
            text(&envelope["signatures"][0]["sig"]).and_then(|s| base64.decode(s).ok()),
        ) else {
            return false;
        };
        let Ok(signature) = Signature::from_der(&sig) else {
            return false;
        };
        let key = p256::ecdsa::VerifyingKey::from(&self.key);
        key.verify(&pae(&payload_type, &payload), &signature).is_ok()
    }
}

/// The text of the key file at `path`, read only up to [`MAX_KEY_BYTES`],
/// and its permission bits.
fn read_key_file(path: &Path) -> Result<(String, u32), SigningError> {
    let failed = |source| SigningError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(failed)?;
    let mode = file.metadata().map_err(failed)?.permissions().mode();
    let mut pem = String::new();
    file.take(MAX_KEY_BYTES + 1).read_to_string(&mut pem).map_err(failed)?;
    if pem.len() as u64 > MAX_KEY_BYTES {
        return Err(SigningError::TooLarge { path: path.to_owned() });
    }
    Ok((pem, mode))
}

/// DSSE's pre-authentication encoding: what an envelope's signature signs.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut encoded = format!("DSSEv1 {} {payload_type} {} ", payload_type.len(), payload.len()).into_bytes();
    encoded.extend_from_slice(payload);
    encoded
}

/// The simple-signing payload that says `reference` (`host/name`) is the
/// image whose manifest is `digest`.
pub fn payload(reference: &str, digest: &Digest) -> Vec<u8> {
    let payload = serde_json::json!({
        "critical": {
            "identity": { "docker-reference": reference },
            "image": { "docker-manifest-digest": digest.as_str() },
            "type": "cosign container image signature",
        },
        "optional": null,
    });
    serde_json::to_vec(&payload).expect("payloads serialise")
}

/// The subject a signature tag (`sha256-<hex>.sig`) names.
pub fn signature_tag(tag: &str) -> Option<Digest> {
    let hex = tag.strip_prefix("sha256-")?.strip_suffix(".sig")?;
    format!("sha256:{hex}").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::VerifyingKey;
    use p256::pkcs8::{DecodePublicKey, EncodePrivateKey};

    /// A signer loaded from a PKCS#8 file of the key whose scalar is `byte`
    /// repeated.
    fn signer(byte: u8) -> Signer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        let secret = p256::SecretKey::from_bytes(&[byte; 32].into()).unwrap();
        std::fs::write(&path, secret.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
        Signer::load(&path).unwrap()
    }

    #[test]
    fn signatures_verify_with_the_public_key_and_are_deterministic() {
        let signer = signer(7);
        let digest = Digest::of(b"manifest");
        let payload = payload("127.0.0.1:5000/shell/hello", &digest);
        let signature = signer.sign(&payload);
        assert_eq!(signature, signer.sign(&payload), "RFC 6979");
        let der = base64::engine::general_purpose::STANDARD.decode(signature).unwrap();
        let key = VerifyingKey::from_public_key_pem(signer.public_pem()).unwrap();
        key.verify(&payload, &Signature::from_der(&der).unwrap()).unwrap();
        let text = String::from_utf8(payload).unwrap();
        assert!(text.contains(r#""docker-manifest-digest":"sha256:"#), "{text}");
    }

    #[test]
    fn envelopes_sign_the_pre_authentication_encoding() {
        let signer = signer(9);
        let envelope: serde_json::Value =
            serde_json::from_slice(&signer.envelope("application/vnd.in-toto+json", b"{}")).unwrap();
        let base64 = base64::engine::general_purpose::STANDARD;
        assert_eq!(base64.decode(envelope["payload"].as_str().unwrap()).unwrap(), b"{}");
        let der = base64
            .decode(envelope["signatures"][0]["sig"].as_str().unwrap())
            .unwrap();
        let key = VerifyingKey::from_public_key_pem(signer.public_pem()).unwrap();
        let signed = pae("application/vnd.in-toto+json", b"{}");
        assert_eq!(signed, b"DSSEv1 28 application/vnd.in-toto+json 2 {}");
        key.verify(&signed, &Signature::from_der(&der).unwrap()).unwrap();
        let envelope = signer.envelope("application/vnd.in-toto+json", b"{}");
        assert!(signer.signed_envelope(&envelope));
        let other = super::tests::signer(8);
        assert!(!other.signed_envelope(&envelope), "another key's");
        assert!(!signer.signed_envelope(b"{}"));
    }

    #[test]
    fn a_file_that_is_not_a_key_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let error = Signer::load(&path).unwrap_err().to_string();
        assert!(error.contains("is not a PEM ECDSA P-256 private key"), "{error}");
        assert!(Signer::load(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_key_file_over_the_bound_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        let mut text = "x".repeat(MAX_KEY_BYTES as usize);
        std::fs::write(&path, &text).unwrap();
        let at_bound = Signer::load(&path).unwrap_err();
        assert!(matches!(at_bound, SigningError::NotAKey { .. }), "read: {at_bound:?}");
        text.push('x');
        std::fs::write(&path, &text).unwrap();
        let error = Signer::load(&path).unwrap_err();
        assert!(matches!(error, SigningError::TooLarge { .. }), "{error:?}");
        assert!(error.to_string().contains("is larger than 64 KiB"), "{error}");
        let endless = Signer::load(Path::new("/dev/zero")).unwrap_err();
        assert!(matches!(endless, SigningError::TooLarge { .. }), "{endless:?}");
    }

    #[test]
    fn signature_tags_name_their_subject() {
        let digest = Digest::of(b"m");
        assert_eq!(
            signature_tag(&format!("sha256-{}.sig", digest.hex())),
            Some(digest.clone())
        );
        assert_eq!(signature_tag(&format!("sha256-{}", digest.hex())), None);
    }
}
