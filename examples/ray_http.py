"""The batch job of ray_batch.py sent to running OpenAI-compatible servers — one `gally serve`, or
replicas behind the balancer of deploy/ — with Ray Data's own HTTP processor (ray.data.llm). The
Ray workers run no gally code and load no model: they need ray[data] and aiohttp only.

    gally serve -m smollm2-135m-instruct --port 8000 --parallel 4 &
    python examples/ray_http.py prompts.jsonl results/ --url http://127.0.0.1:8000/v1 --concurrency 4 -n 128

Rows hold a prompt in --column: text is sent to /v1/completions as it is (as gally.ray.Generator
does), chat messages [{"role": ..., "content": ...}] to /v1/chat/completions. The output has the
columns ray_batch.py writes: every input column plus generated_text, finish_reason, prompt_tokens and
completion_tokens. Each HTTP worker sends its rows one request at a time, so --concurrency is the
number of requests in flight: match it to the servers' slots (replicas × --parallel). Requests that
get 429/502/503/504 or a broken connection are retried (--retries) with exponential backoff.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ray_batch import check_new, read, write_timed  # noqa: E402  (beside this file)

# Workers that only send requests need no core of their own: the servers do the work.
HTTP_CPUS = 0.1


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("input", help="prompts: a .jsonl/.json or .parquet file (or a folder of them)")
    p.add_argument("output", help="a folder for the results")
    p.add_argument("--url", required=True, help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--column", default="prompt", help="the column holding the prompts (default: prompt)")
    p.add_argument("--chat", action="store_true",
                   help="the column holds chat messages: use /chat/completions (default when --column messages)")
    p.add_argument("--served-model", default="", help="the model name the server expects (gally serve: any)")
    p.add_argument("--api-key", default=os.environ.get("GALLY_API_KEY"), help="sent as a bearer token")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per batch handed to a worker (default 16)")
    p.add_argument("--retries", type=int, default=3, help="retries of a failed request (default 3)")
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="most tokens per completion (default 128)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature (default 0: greedy)")
    p.add_argument("--format", choices=("parquet", "json"), default="parquet", help="output files (default parquet)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="a running Ray cluster (auto, host:port, ray://host:10001); default: RAY_ADDRESS, else local")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    chat = args.chat or args.column == "messages"
    if args.address is None:  # local Ray on loopback, no usage report (see ray_batch.py)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    column, model, max_tokens, temperature = args.column, args.served_model, args.max_tokens, args.temp

    def request(row: dict) -> dict:
        prompt = row[column]
        body = {"model": model, "max_tokens": max_tokens, "temperature": temperature}
        body.update({"messages": [dict(m) for m in prompt]} if chat else {"prompt": prompt})
        return {"payload": body}

    def result(row: dict) -> dict:
        reply = row["http_response"]
        if "choices" not in reply:
            raise RuntimeError(f"the server answered {reply.get('error', reply)} for {row['payload']}")
        choice = reply["choices"][0]
        kept = {k: v for k, v in row.items() if k not in ("payload", "http_response")}
        return {**kept, "generated_text": choice["message"]["content"] if chat else choice["text"],
                "finish_reason": choice["finish_reason"], "prompt_tokens": reply["usage"]["prompt_tokens"],
                "completion_tokens": reply["usage"]["completion_tokens"]}

    config = HttpRequestProcessorConfig(
        url=args.url.rstrip("/") + ("/chat/completions" if chat else "/completions"),
        headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else None,
        batch_size=args.batch_size, max_retries=args.retries, base_retry_wait_time_in_s=0.5,
        http_request_stage=dict(concurrency=args.concurrency, num_cpus=HTTP_CPUS))
    processor = build_processor(config, preprocess=request, postprocess=result,
                                preprocess_map_kwargs=dict(num_cpus=HTTP_CPUS),
                                postprocess_map_kwargs=dict(num_cpus=HTTP_CPUS))

    ray.init(address=args.address, include_dashboard=False, ignore_reinit_error=True)
    check_new(args.output)
    out = processor(read(args.input))
    rows, tokens, seconds = write_timed(out, args.output, args.format)
    print(f"{rows} rows, {tokens} completion tokens in {seconds:.1f} s ({tokens / seconds:.1f} tok/s, "
          f"{args.concurrency} requests in flight) → {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
