//! Request signing, signature version 1, as the API documents it and the Go SDK (hostnic) does:
//! every parameter but `signature`, sorted byte-wise by name, values percent-encoded with the
//! RFC 3986 unreserved set and uppercase hex (space is `%20`), joined with `&`; then
//! `METHOD \n PATH \n query` is signed with HMAC-SHA256 (or SHA1) under the secret key and
//! base64-encoded. Pure: the client signs with it and the simulator verifies with it.

use std::collections::BTreeMap;

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};

/// Request parameters by name; a `BTreeMap` keeps them in the byte-wise order signing needs.
pub type Params = BTreeMap<String, String>;

/// The digest a signature is made with (`signature_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureMethod {
    /// `HmacSHA256`, what the Go SDK always sends.
    HmacSha256,
    /// `HmacSHA1`.
    HmacSha1,
}

impl SignatureMethod {
    /// The parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HmacSha256 => "HmacSHA256",
            Self::HmacSha1 => "HmacSHA1",
        }
    }

    /// The method a `signature_method` value names, if any.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "HmacSHA256" => Some(Self::HmacSha256),
            "HmacSHA1" => Some(Self::HmacSha1),
            _ => None,
        }
    }
}

/// Percent-encodes `value`: `A-Z a-z 0-9 - _ . ~` stay, every other UTF-8 byte becomes `%XX`
/// with uppercase hex (so a space is `%20` and `:` of a MAC-form NIC id is `%3A`).
pub fn percent_encode(value: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    out
}

/// Decodes an `application/x-www-form-urlencoded` string (a query or a POST body): `+` is a
/// space, `%XX` a byte. Pairs keep their order; a name without `=` has an empty value.
pub fn form_decode(text: &str) -> Result<Vec<(String, String)>, String> {
    fn unescape(part: &str) -> Result<String, String> {
        let bytes = part.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = part
                        .get(i + 1..i + 3)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| format!("bad percent escape in {part:?}"))?;
                    out.push(hex);
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|_| format!("{part:?} is not UTF-8 once decoded"))
    }
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((unescape(name)?, unescape(value)?))
        })
        .collect()
}

/// The canonical query: every parameter but `signature`, sorted by name, `name=value` pairs
/// percent-encoded and joined with `&` (an empty value still gives `name=`).
pub fn canonical_query(params: &Params) -> String {
    params
        .iter()
        .filter(|(name, _)| name.as_str() != "signature")
        .map(|(name, value)| format!("{}={}", percent_encode(name), percent_encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `METHOD \n PATH \n canonical query`, the text that is signed.
pub fn string_to_sign(http_method: &str, path: &str, canonical: &str) -> String {
    format!("{http_method}\n{path}\n{canonical}")
}

fn mac_bytes(secret: &[u8], method: SignatureMethod, text: &str) -> Vec<u8> {
    // HMAC takes a key of any length, so `new_from_slice` cannot fail; an empty MAC is never
    // equal to a real one, should it ever.
    match method {
        SignatureMethod::HmacSha256 => Hmac::<sha2::Sha256>::new_from_slice(secret)
            .map(|mut mac| {
                mac.update(text.as_bytes());
                mac.finalize().into_bytes().to_vec()
            })
            .unwrap_or_default(),
        SignatureMethod::HmacSha1 => Hmac::<sha1::Sha1>::new_from_slice(secret)
            .map(|mut mac| {
                mac.update(text.as_bytes());
                mac.finalize().into_bytes().to_vec()
            })
            .unwrap_or_default(),
    }
}

/// The signature (standard base64 with padding, not URL-encoded) of a request.
pub fn signature(
    secret: &[u8],
    method: SignatureMethod,
    http_method: &str,
    path: &str,
    params: &Params,
) -> String {
    let text = string_to_sign(http_method, path, &canonical_query(params));
    base64::engine::general_purpose::STANDARD.encode(mac_bytes(secret, method, &text))
}

/// Whether `given` (base64, as decoded from the request) is the signature of the request.
/// Compares the MACs in constant time.
pub fn verify(
    secret: &[u8],
    method: SignatureMethod,
    http_method: &str,
    path: &str,
    params: &Params,
    given: &str,
) -> bool {
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(given.trim()) else {
        return false;
    };
    let text = string_to_sign(http_method, path, &canonical_query(params));
    let expected = mac_bytes(secret, method, &text);
    expected.len() == given.len()
        && expected
            .iter()
            .zip(&given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The query of a signed GET: the canonical query, then `&signature=` and the URL-encoded
/// signature, exactly as the Go SDK sends it.
pub fn signed_query(
    secret: &[u8],
    method: SignatureMethod,
    http_method: &str,
    path: &str,
    params: &Params,
) -> String {
    let sig = signature(secret, method, http_method, path, params);
    format!(
        "{}&signature={}",
        canonical_query(params),
        percent_encode(&sig)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"SECRETACCESSKEY";

    fn params(pairs: &[(&str, &str)]) -> Params {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn vector_a(zone: &str) -> Params {
        params(&[
            ("count", "1"),
            ("vxnets.1", "vxnet-0"),
            ("zone", zone),
            ("instance_type", "small_b"),
            ("signature_version", "1"),
            ("signature_method", "HmacSHA256"),
            ("instance_name", "demo"),
            ("image_id", "centos64x86a"),
            ("login_mode", "passwd"),
            ("login_passwd", "QingCloud20130712"),
            ("version", "1"),
            ("access_key_id", "QYACCESSKEYIDEXAMPLE"),
            ("action", "RunInstances"),
            ("time_stamp", "2013-08-27T14:30:10Z"),
        ])
    }

    /// The derived vectors' common parameters: what the Go SDK sends (no `version`).
    fn derived(action_params: &[(&str, &str)]) -> Params {
        let mut p = params(&[
            ("access_key_id", "QYACCESSKEYIDEXAMPLE"),
            ("time_stamp", "2013-08-27T14:30:10Z"),
            ("zone", "pek3a"),
            ("signature_version", "1"),
            ("signature_method", "HmacSHA256"),
        ]);
        p.extend(params(action_params));
        p
    }

    #[test]
    fn official_vector_a_string_to_sign_signature_and_url() {
        let p = vector_a("pek3a");
        assert_eq!(
            string_to_sign("GET", "/iaas/", &canonical_query(&p)),
            "GET\n/iaas/\naccess_key_id=QYACCESSKEYIDEXAMPLE&action=RunInstances&count=1&image_id=centos64x86a&instance_name=demo&instance_type=small_b&login_mode=passwd&login_passwd=QingCloud20130712&signature_method=HmacSHA256&signature_version=1&time_stamp=2013-08-27T14%3A30%3A10Z&version=1&vxnets.1=vxnet-0&zone=pek3a"
        );
        let sig = signature(SECRET, SignatureMethod::HmacSha256, "GET", "/iaas/", &p);
        assert_eq!(sig, "byjccvWIvAftaq+oublemagH3bYAlDWxxLFAzAsyslw=");
        assert_eq!(
            format!(
                "https://api.qingcloud.com/iaas/?{}",
                signed_query(SECRET, SignatureMethod::HmacSha256, "GET", "/iaas/", &p)
            ),
            "https://api.qingcloud.com/iaas/?access_key_id=QYACCESSKEYIDEXAMPLE&action=RunInstances&count=1&image_id=centos64x86a&instance_name=demo&instance_type=small_b&login_mode=passwd&login_passwd=QingCloud20130712&signature_method=HmacSHA256&signature_version=1&time_stamp=2013-08-27T14%3A30%3A10Z&version=1&vxnets.1=vxnet-0&zone=pek3a&signature=byjccvWIvAftaq%2BoublemagH3bYAlDWxxLFAzAsyslw%3D"
        );
        assert!(verify(
            SECRET,
            SignatureMethod::HmacSha256,
            "GET",
            "/iaas/",
            &p,
            &sig
        ));
    }

    #[test]
    fn official_vector_b_zone_pek1() {
        let sig = signature(
            SECRET,
            SignatureMethod::HmacSha256,
            "GET",
            "/iaas/",
            &vector_a("pek1"),
        );
        assert_eq!(sig, "32bseYy39DOlatuewpeuW5vpmW51sD1A/JdGynqSpP8=");
    }

    #[test]
    fn go_sdk_vector_c_path_without_trailing_slash() {
        let p = params(&[
            ("access_key_id", "ENV_ACCESS_KEY_ID"),
            ("action", "DescribeInstance"),
            ("instance.0", "i-xxxxxxxx"),
            ("signature_method", "HmacSHA256"),
            ("signature_version", "1"),
            ("time_stamp", "0001-01-01T00:00:00Z"),
            ("verbose", "1"),
        ]);
        assert_eq!(
            canonical_query(&p),
            "access_key_id=ENV_ACCESS_KEY_ID&action=DescribeInstance&instance.0=i-xxxxxxxx&signature_method=HmacSHA256&signature_version=1&time_stamp=0001-01-01T00%3A00%3A00Z&verbose=1"
        );
        let secret = b"ENV_SECRET_ACCESS_KEY";
        let query = signed_query(secret, SignatureMethod::HmacSha256, "GET", "/iaas", &p);
        assert!(
            query.ends_with("&signature=ZHa2iQ8PeyP1ktMF9C%2BDjOQBl537ti9RnYZ1Qqr6KRg%3D"),
            "{query}"
        );
        let with_slash = signature(secret, SignatureMethod::HmacSha256, "GET", "/iaas/", &p);
        assert!(with_slash.starts_with("m97g5UMn"), "{with_slash}");
    }

    #[test]
    fn derived_vectors_from_the_python_sdk_signer() {
        let cases: [(&str, &str, Params, &str, &str); 7] = [
            (
                "GET",
                "/iaas",
                derived(&[
                    ("action", "AttachNics"),
                    ("instance", "i-abcd1234"),
                    ("nics.1", "52:54:9e:12:34:56"),
                    ("nics.2", "52:54:9e:ab:cd:ef"),
                ]),
                "access_key_id=QYACCESSKEYIDEXAMPLE&action=AttachNics&instance=i-abcd1234&nics.1=52%3A54%3A9e%3A12%3A34%3A56&nics.2=52%3A54%3A9e%3Aab%3Acd%3Aef&signature_method=HmacSHA256&signature_version=1&time_stamp=2013-08-27T14%3A30%3A10Z&zone=pek3a",
                "2F6pkGP/g7ScvrMtfC+1rX6Q4EC7FoZejWDCcrH8YpY=",
            ),
            (
                "GET",
                "/iaas",
                derived(&[
                    ("action", "DescribeNics"),
                    ("limit", "20"),
                    ("offset", "0"),
                    ("nics.1", "52:54:00:00:00:01"),
                    ("nics.2", "52:54:00:00:00:02"),
                    ("nics.10", "52:54:00:00:00:0a"),
                ]),
                "access_key_id=QYACCESSKEYIDEXAMPLE&action=DescribeNics&limit=20&nics.1=52%3A54%3A00%3A00%3A00%3A01&nics.10=52%3A54%3A00%3A00%3A00%3A0a&nics.2=52%3A54%3A00%3A00%3A00%3A02&offset=0&signature_method=HmacSHA256&signature_version=1&time_stamp=2013-08-27T14%3A30%3A10Z&zone=pek3a",
                "jzV6KjFFNEHp53oJ+7waNkjvN8BQedb17btIqIvnqDg=",
            ),
            (
                "GET",
                "/iaas",
                derived(&[
                    ("action", "AttachTags"),
                    ("resource_tag_pairs.1.resource_id", "52:54:9e:12:34:56"),
                    ("resource_tag_pairs.1.resource_type", "nic"),
                    ("resource_tag_pairs.1.tag_id", "tag-hp55o9i5"),
                ]),
                "access_key_id=QYACCESSKEYIDEXAMPLE&action=AttachTags&resource_tag_pairs.1.resource_id=52%3A54%3A9e%3A12%3A34%3A56&resource_tag_pairs.1.resource_type=nic&resource_tag_pairs.1.tag_id=tag-hp55o9i5&signature_method=HmacSHA256&signature_version=1&time_stamp=2013-08-27T14%3A30%3A10Z&zone=pek3a",
                "35z0rdX/wSsPTJRLM3zUYBtmx936zd7AhmkQwN8w61w=",
            ),
            (
                "GET",
                "/iaas",
                derived(&[
                    ("action", "DescribeJobs"),
                    ("jobs.1", "j-bm6ym3r8"),
                    ("limit", "20"),
                    ("offset", "0"),
                    ("verbose", "0"),
                ]),
                "access_key_id=QYACCESSKEYIDEXAMPLE&action=DescribeJobs&jobs.1=j-bm6ym3r8&limit=20&offset=0&signature_method=HmacSHA256&signature_version=1&time_stamp=2013-08-27T14%3A30%3A10Z&verbose=0&zone=pek3a",
                "bXZhQotqIvJhRb/ITvK8WQ8kGO8PxBivSoySbEskPv8=",
            ),
            (
                "GET",
                "/iaas/",
                derived(&[
                    ("action", "CreateNics"),
                    ("count", "1"),
                    ("nic_name", "hostnic test/x*~"),
                    ("vxnet", "vxnet-abc1234"),
                    ("version", "1"),
                ]),
                "access_key_id=QYACCESSKEYIDEXAMPLE&action=CreateNics&count=1&nic_name=hostnic%20test%2Fx%2A~&signature_method=HmacSHA256&signature_version=1&time_stamp=2013-08-27T14%3A30%3A10Z&version=1&vxnet=vxnet-abc1234&zone=pek3a",
                "hv0MZoatrOL8/mmQNZ8tsTxywsj9wHwxoP1xwuoWAZ4=",
            ),
            (
                "POST",
                "/iaas/",
                vector_a("pek3a"),
                "access_key_id=QYACCESSKEYIDEXAMPLE&action=RunInstances&count=1&image_id=centos64x86a&instance_name=demo&instance_type=small_b&login_mode=passwd&login_passwd=QingCloud20130712&signature_method=HmacSHA256&signature_version=1&time_stamp=2013-08-27T14%3A30%3A10Z&version=1&vxnets.1=vxnet-0&zone=pek3a",
                "VOy3hWMVHrA65zM7bSWnZ3RQHkApWoyadnzuDrtKq9c=",
            ),
            (
                "GET",
                "/iaas/",
                {
                    let mut p = vector_a("pek3a");
                    p.insert("signature_method".into(), "HmacSHA1".into());
                    p
                },
                "access_key_id=QYACCESSKEYIDEXAMPLE&action=RunInstances&count=1&image_id=centos64x86a&instance_name=demo&instance_type=small_b&login_mode=passwd&login_passwd=QingCloud20130712&signature_method=HmacSHA1&signature_version=1&time_stamp=2013-08-27T14%3A30%3A10Z&version=1&vxnets.1=vxnet-0&zone=pek3a",
                "J6HXH2ms54sgN+hVb2Hli8M9IQM=",
            ),
        ];
        for (http_method, path, p, canonical, expected) in cases {
            assert_eq!(canonical_query(&p), canonical);
            let method = SignatureMethod::parse(&p["signature_method"]).expect("known method");
            let sig = signature(SECRET, method, http_method, path, &p);
            assert_eq!(sig, expected, "{}", p["action"]);
            assert!(verify(SECRET, method, http_method, path, &p, &sig));
            assert!(!verify(b"WRONGSECRET", method, http_method, path, &p, &sig));
        }
    }

    #[test]
    fn the_signature_covers_every_parameter_the_path_and_the_method() {
        let p = derived(&[("action", "DescribeNics")]);
        let sig = signature(SECRET, SignatureMethod::HmacSha256, "GET", "/iaas", &p);
        let mut changed = p.clone();
        changed.insert("zone".into(), "pek3b".into());
        assert!(!verify(
            SECRET,
            SignatureMethod::HmacSha256,
            "GET",
            "/iaas",
            &changed,
            &sig
        ));
        assert!(!verify(
            SECRET,
            SignatureMethod::HmacSha256,
            "GET",
            "/iaas/",
            &p,
            &sig
        ));
        assert!(!verify(
            SECRET,
            SignatureMethod::HmacSha256,
            "POST",
            "/iaas",
            &p,
            &sig
        ));
        assert!(!verify(
            SECRET,
            SignatureMethod::HmacSha1,
            "GET",
            "/iaas",
            &p,
            &sig
        ));
        assert!(!verify(
            SECRET,
            SignatureMethod::HmacSha256,
            "GET",
            "/iaas",
            &p,
            "not base64!"
        ));
        let mut with_sig = p.clone();
        with_sig.insert("signature".into(), sig.clone());
        assert!(verify(
            SECRET,
            SignatureMethod::HmacSha256,
            "GET",
            "/iaas",
            &with_sig,
            &sig
        ));
    }

    #[test]
    fn percent_encoding_and_form_decoding_round_trip() {
        assert_eq!(
            percent_encode("a b+c/d:e*f~g-h_i.j"),
            "a%20b%2Bc%2Fd%3Ae%2Af~g-h_i.j"
        );
        assert_eq!(percent_encode("é"), "%C3%A9");
        let decoded = form_decode("a=x+y&b=%3A%2b&c&d=").expect("decodes");
        assert_eq!(
            decoded,
            vec![
                ("a".into(), "x y".into()),
                ("b".into(), ":+".into()),
                ("c".into(), String::new()),
                ("d".into(), String::new()),
            ]
        );
        assert!(form_decode("a=%zz").is_err());
        assert!(form_decode("a=%ff").is_err());
        let p = derived(&[("nic_name", "hostnic test/x*~ é+")]);
        let round: Params = form_decode(&canonical_query(&p))
            .expect("decodes")
            .into_iter()
            .collect();
        assert_eq!(round, p);
    }
}
