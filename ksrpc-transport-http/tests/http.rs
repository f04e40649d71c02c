//! The HTTP transport against an in-memory executor: status codes of the
//! pre-body checks, the chunked framing both ways, and hostile bodies.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::body::MessageBody;
use actix_web::http::{header, StatusCode};
use actix_web::{middleware, test, web, App};
use base64::Engine;
use bytes::Bytes;
use ksrpc_core::auth::{AuthTuning, UserStore};
use ksrpc_core::chain::{Call, CallChain};
use ksrpc_core::codec::Zstd;
use ksrpc_core::codec::{decode_all, encode_to_vec, ChunkedZlib, Limits, BORDER};
use ksrpc_core::native::{self, ClientMessage, Outcome, ServerMessage, Value};
use ksrpc_core::{CompatReply, CompatRequest, ExecError, Executor, NativeRequest, RuleSet};
use ksrpc_transport::{guard, ServerState};
use ksrpc_transport_http::routes;

/// Echoes the payload reversed, so a test sees the executor really ran;
/// a payload of `bad` is a bad request.
struct Echo;

#[async_trait::async_trait]
impl Executor for Echo {
    async fn call_compat(&self, req: CompatRequest) -> Result<CompatReply, ExecError> {
        if &req.payload[..] == b"bad" {
            return Err(ExecError::BadRequest {
                message: "not a call".into(),
                reply: Bytes::new(),
                summary: String::new(),
            });
        }
        let mut body = req.payload.to_vec();
        body.reverse();
        Ok(CompatReply {
            status: 200,
            body: body.into(),
            summary: format!("echo for {}", req.user.name),
            cache_chain: None,
            outcome: ksrpc_core::CallOutcome::Ok,
        })
    }

    async fn call_native(&self, req: NativeRequest) -> Result<Outcome, ExecError> {
        Ok(Outcome::Ok(Value::Str(format!("{} {} {}", req.user.name, req.chain.module, req.chain.calls.len()))))
    }
}

fn state(limits: Limits) -> web::Data<ServerState> {
    let mut users = UserStore::new(AuthTuning::default());
    users.add_plain("admin", "secret", RuleSet::parse(&["allow *"]).unwrap());
    web::Data::new(ServerState {
        users: Arc::new(users),
        executor: Arc::new(Echo),
        codec: ChunkedZlib::default(),
        limits,
        timestamp_window: 30.0,
        in_flight: Default::default(),
        budget: ksrpc_core::MemoryBudget::unlimited(),
        body_idle: std::time::Duration::from_secs(60),
        send_timeout: std::time::Duration::from_secs(300),
        cache: None,
        trusted_proxies: Vec::new(),
        stopping: ksrpc_transport::Stopping::never(),
    })
}

fn now() -> String {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64().to_string()
}

fn basic(user: &str, pw: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}")))
}

macro_rules! app {
    ($limits:expr, $prefix:expr) => {
        test::init_service(
            App::new()
                .app_data(state($limits))
                .wrap(middleware::from_fn(guard))
                .configure(routes($prefix))
                .configure(ksrpc_transport_ws::routes($prefix)),
        )
        .await
    };
}

fn authed(req: test::TestRequest) -> test::TestRequest {
    req.insert_header(("X-Timestamp", now())).insert_header((header::AUTHORIZATION, basic("admin", "secret")))
}

#[actix_web::test]
async fn checks_run_in_the_original_order_with_its_status_codes() {
    let app = app!(Limits::default(), "/api/v1");
    let cases: Vec<(test::TestRequest, StatusCode)> = vec![
        (test::TestRequest::post().uri("/api/v1/chunk"), StatusCode::FORBIDDEN),
        (test::TestRequest::post().uri("/api/v1/chunk").insert_header(("X-Timestamp", "nan")), StatusCode::FORBIDDEN),
        (test::TestRequest::post().uri("/api/v1/chunk").insert_header(("X-Timestamp", "inf")), StatusCode::FORBIDDEN),
        (test::TestRequest::post().uri("/api/v1/chunk").insert_header(("X-Timestamp", "12")), StatusCode::FORBIDDEN),
        (
            test::TestRequest::post().uri("/api/v1/chunk").insert_header(("X-Timestamp", now())),
            StatusCode::UNAUTHORIZED,
        ),
        (
            test::TestRequest::post()
                .uri("/api/v1/chunk")
                .insert_header(("X-Timestamp", now()))
                .insert_header((header::AUTHORIZATION, basic("admin", "wrong"))),
            StatusCode::UNAUTHORIZED,
        ),
        (test::TestRequest::get().uri("/nowhere"), StatusCode::FORBIDDEN),
        (authed(test::TestRequest::get().uri("/nowhere")), StatusCode::NOT_FOUND),
        (authed(test::TestRequest::get().uri("/api/v1/chunk")), StatusCode::METHOD_NOT_ALLOWED),
        (authed(test::TestRequest::get().uri("/api/v1/generate_204")), StatusCode::NO_CONTENT),
        (authed(test::TestRequest::post().uri("/api/v1/generate_204")), StatusCode::NO_CONTENT),
    ];
    for (req, want) in cases {
        // Middleware refusals come back as errors from the test service; a
        // real server turns them into these same responses.
        let res = match test::try_call_service(&app, req.to_request()).await {
            Ok(res) => res.map_into_boxed_body().into_parts().1,
            Err(e) => e.error_response(),
        };
        assert_eq!(res.status(), want);
        if want == StatusCode::UNAUTHORIZED {
            assert_eq!(res.headers().get(header::WWW_AUTHENTICATE).unwrap(), r#"Basic realm="Restricted Area""#);
            let body = actix_web::body::to_bytes(res.into_body()).await.unwrap();
            assert_eq!(&body[..], b"Unauthorized");
        }
    }
}

#[actix_web::test]
async fn a_call_round_trips_through_the_framing_with_a_chunked_reply() {
    let app = app!(Limits::default(), "/api/v1/{time}");
    for size in [10usize, 1 << 20] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 31 % 253) as u8).collect();
        let wire = encode_to_vec(&ChunkedZlib::default(), Bytes::from(payload.clone())).unwrap();
        let req = authed(test::TestRequest::post().uri("/api/v1/20261125/chunk")).set_payload(wire).to_request();
        let res = test::call_service(&app, req).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.headers().get(header::CONTENT_LENGTH).is_none(), "reply must be chunked, not sized");
        assert!(matches!(res.response().body().size(), actix_web::body::BodySize::Stream));
        let body = test::read_body(res).await;
        assert!(body.ends_with(BORDER));
        let mut want = payload.clone();
        want.reverse();
        assert_eq!(decode_all(&ChunkedZlib::default(), &body, Limits::default()).unwrap(), want);
    }
}

#[actix_web::test]
async fn hostile_bodies_get_clear_4xx() {
    let limits = Limits { max_encoded: 1 << 20, max_decoded: 4 << 20 };
    let app = app!(limits, "/api/v1");
    let bomb = {
        let zeros = Bytes::from(vec![0u8; 64 << 20]);
        encode_to_vec(&ChunkedZlib::with_level(ksrpc_core::Level::Fixed(9)), zeros).unwrap()
    };
    let cases: Vec<(Vec<u8>, StatusCode, &str)> = vec![
        (b"garbage bytes".to_vec(), StatusCode::BAD_REQUEST, "inside a slice"),
        (vec![], StatusCode::BAD_REQUEST, "empty"),
        (vec![b'x'; 900_000], StatusCode::BAD_REQUEST, "border"),
        ([&b"not zlib"[..], BORDER].concat(), StatusCode::BAD_REQUEST, "corrupt"),
        (vec![b'x'; 2 << 20], StatusCode::PAYLOAD_TOO_LARGE, "limit"),
        (bomb, StatusCode::PAYLOAD_TOO_LARGE, "decodes"),
        (
            encode_to_vec(&ChunkedZlib::default(), Bytes::from_static(b"bad")).unwrap(),
            StatusCode::BAD_REQUEST,
            "not a call",
        ),
    ];
    for (body, want, words) in cases {
        let req = authed(test::TestRequest::post().uri("/api/v1/chunk")).set_payload(body).to_request();
        let res = test::call_service(&app, req).await;
        assert_eq!(res.status(), want, "{words}");
        let text = String::from_utf8_lossy(&test::read_body(res).await).to_string();
        assert!(text.contains(words), "{text:?} should mention {words:?}");
    }
}

#[actix_web::test]
async fn a_native_call_round_trips_and_another_version_is_refused() {
    let app = app!(Limits::default(), "/api/v1");
    let call = ClientMessage::Call {
        id: 7,
        chain: CallChain::new("ksrpc.server.demo").then(Call::method("add", vec![Value::Int(1), Value::Int(2)])),
    };
    let body = encode_to_vec(&Zstd::default(), Bytes::from(native::encode(&call))).unwrap();
    let req = authed(test::TestRequest::post().uri("/api/v1/v2/call")).set_payload(body).to_request();
    let res = test::call_service(&app, req).await;
    assert_eq!(res.status(), StatusCode::OK);
    let bytes = decode_all(&Zstd::default(), &test::read_body(res).await, Limits::default()).unwrap();
    assert_eq!(
        native::decode::<ServerMessage>(&bytes).unwrap(),
        ServerMessage::Reply { id: 7, outcome: Outcome::Ok(Value::Str("admin ksrpc.server.demo 1".into())) }
    );
    // Version 9: refused with a readable reason.
    let mut raw = native::encode(&call);
    raw[0] = 9;
    let body = encode_to_vec(&Zstd::default(), Bytes::from(raw)).unwrap();
    let req = authed(test::TestRequest::post().uri("/api/v1/v2/call")).set_payload(body).to_request();
    let res = test::call_service(&app, req).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let bytes = decode_all(&Zstd::default(), &test::read_body(res).await, Limits::default()).unwrap();
    match native::decode::<ServerMessage>(&bytes).unwrap() {
        ServerMessage::Refused { reason } => assert!(reason.contains("version 9"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Not zstd at all: a clear 400.
    let req = authed(test::TestRequest::post().uri("/api/v1/v2/call")).set_payload(b"garbage".to_vec()).to_request();
    let res = test::call_service(&app, req).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
}
