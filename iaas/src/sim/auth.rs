//! The simulator's checks of who is calling and when: the signature (1200) and the
//! `time_stamp` window (1300), as the real API answers them. Pure.

use std::time::Duration;

use crate::config::SecretKey;
use crate::error::code;
use crate::sign::{self, Params, SignatureMethod};
use crate::timefmt;

use super::cloud::ApiError;

fn auth_failure(text: &str) -> ApiError {
    ApiError::new(code::AUTH_FAILURE, format!("AuthFailure, {text}"))
}

/// Checks the request's signature: a known `access_key_id`, `signature_version` 1, a known
/// `signature_method`, and a `signature` that matches the other parameters as received, the
/// path and the method. Every failure is 1200.
pub fn verify_signature(
    http_method: &str,
    path: &str,
    params: &Params,
    access_key_id: &str,
    secret: &SecretKey,
) -> Result<(), ApiError> {
    match params.get("access_key_id") {
        Some(id) if id == access_key_id => {}
        Some(id) => return Err(auth_failure(&format!("access key [{id}] not found"))),
        None => return Err(auth_failure("parameter [access_key_id] is required")),
    }
    if params.get("signature_version").map(String::as_str) != Some("1") {
        return Err(auth_failure("signature_version should be 1"));
    }
    let method = params
        .get("signature_method")
        .and_then(|m| SignatureMethod::parse(m))
        .ok_or_else(|| auth_failure("signature_method should be HmacSHA256 or HmacSHA1"))?;
    let given = params
        .get("signature")
        .ok_or_else(|| auth_failure("parameter [signature] is required"))?;
    if !sign::verify(secret.expose(), method, http_method, path, params, given) {
        return Err(auth_failure("signature not matched"));
    }
    Ok(())
}

/// Checks `time_stamp` (1100 if missing or malformed, 1300 if further than `window` from
/// `now_unix`) and `expires` when given (1300 once past).
pub fn verify_time(params: &Params, now_unix: i64, window: Duration) -> Result<(), ApiError> {
    let stamp = params.get("time_stamp").ok_or_else(|| {
        ApiError::new(
            code::MALFORMED,
            "InvalidParameter, parameter [time_stamp] is required",
        )
    })?;
    let at = timefmt::parse_utc(stamp).ok_or_else(|| {
        ApiError::new(
            code::MALFORMED,
            format!("InvalidParameter, time_stamp [{stamp}] is not YYYY-MM-DDThh:mm:ssZ"),
        )
    })?;
    let window = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
    if (now_unix - at).abs() > window {
        return Err(ApiError::new(
            code::MESSAGE_EXPIRED,
            format!("MessageExpired, time_stamp [{stamp}] is more than {window} seconds from now"),
        ));
    }
    if let Some(expires) = params.get("expires") {
        let until = timefmt::parse_utc(expires).ok_or_else(|| {
            ApiError::new(
                code::MALFORMED,
                format!("InvalidParameter, expires [{expires}] is not YYYY-MM-DDThh:mm:ssZ"),
            )
        })?;
        if now_unix > until {
            return Err(ApiError::new(
                code::MESSAGE_EXPIRED,
                format!("MessageExpired, the request expired at [{expires}]"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_time_window_and_expires_are_enforced() {
        let at = timefmt::parse_utc("2013-08-27T14:30:10Z").expect("parses");
        let p = params(&[("time_stamp", "2013-08-27T14:30:10Z")]);
        let w = Duration::from_secs(60);
        assert_eq!(verify_time(&p, at + 60, w), Ok(()));
        assert_eq!(verify_time(&p, at - 60, w), Ok(()));
        assert_eq!(verify_time(&p, at + 61, w).map_err(|e| e.code), Err(1300));
        assert_eq!(verify_time(&p, at - 61, w).map_err(|e| e.code), Err(1300));
        let mut e = p.clone();
        e.insert("expires".into(), "2013-08-27T14:30:20Z".into());
        assert_eq!(verify_time(&e, at + 10, w), Ok(()));
        assert_eq!(verify_time(&e, at + 11, w).map_err(|e| e.code), Err(1300));
        assert_eq!(
            verify_time(&params(&[]), at, w).map_err(|e| e.code),
            Err(1100)
        );
        let bad = params(&[("time_stamp", "2013-08-27 14:30:10")]);
        assert_eq!(verify_time(&bad, at, w).map_err(|e| e.code), Err(1100));
    }

    #[test]
    fn official_vector_a_verifies_and_any_change_is_1200() {
        let secret = SecretKey::new("SECRETACCESSKEY");
        let mut p = params(&[
            ("count", "1"),
            ("vxnets.1", "vxnet-0"),
            ("zone", "pek3a"),
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
            ("signature", "byjccvWIvAftaq+oublemagH3bYAlDWxxLFAzAsyslw="),
        ]);
        let ok = verify_signature("GET", "/iaas/", &p, "QYACCESSKEYIDEXAMPLE", &secret);
        assert_eq!(ok, Ok(()));
        let code = |r: Result<(), ApiError>| r.map_err(|e| e.code);
        assert_eq!(
            code(verify_signature(
                "GET",
                "/iaas",
                &p,
                "QYACCESSKEYIDEXAMPLE",
                &secret
            )),
            Err(1200)
        );
        assert_eq!(
            code(verify_signature(
                "POST",
                "/iaas/",
                &p,
                "QYACCESSKEYIDEXAMPLE",
                &secret
            )),
            Err(1200)
        );
        assert_eq!(
            code(verify_signature("GET", "/iaas/", &p, "OTHERKEY", &secret)),
            Err(1200)
        );
        let wrong = SecretKey::new("WRONG");
        assert_eq!(
            code(verify_signature(
                "GET",
                "/iaas/",
                &p,
                "QYACCESSKEYIDEXAMPLE",
                &wrong
            )),
            Err(1200)
        );
        p.insert("count".into(), "2".into());
        assert_eq!(
            code(verify_signature(
                "GET",
                "/iaas/",
                &p,
                "QYACCESSKEYIDEXAMPLE",
                &secret
            )),
            Err(1200)
        );
    }
}
