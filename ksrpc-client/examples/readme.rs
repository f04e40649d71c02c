#![allow(clippy::print_stdout)] // an example: what it prints is its output
use ksrpc_client::Client;

#[tokio::main]
async fn main() -> Result<(), ksrpc_client::Error> {
    // The URL as given to the Python client; ws://…/api/v1/ws for the WebSocket.
    let url = std::env::var("KSRPC_URL").unwrap_or_else(|_| "http://127.0.0.1:8080/api/v1".into());
    let client = Client::builder(url)
        .credentials("admin", std::env::var("KSRPC_PASSWORD").unwrap_or_default())
        .connect()
        .await?;
    let demo = client.module("ksrpc.server.demo");
    let sum: i64 = demo.clone().call("add", (1, 2)).collect().await?; // demo.add(1, 2)
    let list: Vec<i64> = demo.clone().attr("LIST").collect().await?; // demo.LIST
    let frame = demo.call("test", ()).record_batches().await?; // a DataFrame, as Arrow
    let rows: usize = frame.iter().map(|b| b.num_rows()).sum();
    println!("{sum} {} {rows} rows", list.len()); // prints "3 5 5 rows"
    Ok(())
}
