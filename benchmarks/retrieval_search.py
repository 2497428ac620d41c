"""Retriever benchmark: query encoding throughput, and search time exact (torch) vs FAISS.

    python benchmarks/retrieval_search.py [--threads 2] [--gallery 100000] [--repeats 5]

1. Query encoding: all-MiniLM-L6-v2 queries/s at the evaluation batch size (32-token cap),
   with the fraction of the machine's fp32 matmul peak it reaches (the encoder runs in fp32; both
   peaks are measured at the start of the run, same threads: benchmarks/peak.py).
2. Search, 1k queries x 1k videos (MSR-VTT 1k-A size) and 1k x 100k (a large gallery), 384-d unit
   vectors, top-10: exact torch matmul + topk, FAISS IndexFlatIP (exact), FAISS IVF (approximate,
   recall@10 against exact shown) and HNSW. Medians over repeats; ratios against torch exact.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from peak import describe, measure_peaks, median_seconds, share

DIM, K = 384, 10


def query_encoding(repeats: int, batch: int = 64) -> dict:
    from caredpo.retrieval.model import Retriever, RetrieverConfig

    model = Retriever(RetrieverConfig(text_encoder="minilm")).eval()
    words = "a small red circle slides from left to right over the grass and turns blue halfway".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=rng.integers(6, 16))) for _ in range(batch)]
    n_tok = model.tokenizer(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")[
        "input_ids"
    ].numel()
    with torch.no_grad():
        model.encode_queries(texts)  # warm-up
        sec = median_seconds(lambda: model.encode_queries(texts), repeats)
    layers, h, inter = model.encoder.config.num_hidden_layers, model.hidden_size, model.encoder.config.intermediate_size
    flop = 2 * n_tok * layers * (4 * h * h + 2 * h * inter)  # linear layers only (attention maps are small)
    return {"queries_per_s": batch / sec, "gflops": flop / sec / 1e9, "batch": batch, "tokens": n_tok}


def unit(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def search_rows(n_query: int, n_gallery: int, repeats: int) -> list[tuple[str, float, float, float]]:
    """[(method, build s, search s, recall@10 vs exact)]."""

    rng = np.random.default_rng(0)
    # clustered gallery (like real embeddings); queries near gallery items
    centres = unit(256, rng)
    gallery = unit(n_gallery, rng) * 0.5 + centres[rng.integers(0, 256, n_gallery)]
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[rng.integers(0, n_gallery, n_query)] + 0.3 * unit(n_query, rng)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    gq, gg = torch.from_numpy(queries), torch.from_numpy(gallery)
    exact = torch.topk(gq @ gg.T, K, dim=1).indices.numpy()
    rows = [("torch exact (matmul+topk)", 0.0, median_seconds(lambda: torch.topk(gq @ gg.T, K, dim=1), repeats), 1.0)]
    for name, build in _faiss_indexes(n_gallery).items():
        t = time.perf_counter()
        index = build(gallery)
        built = time.perf_counter() - t
        _, found = index.search(queries, K)
        recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact)])
        rows.append((name, built, median_seconds(lambda index=index: index.search(queries, K), repeats), float(recall)))
    return rows


def _faiss_indexes(n: int) -> dict:
    import faiss

    def flat(x):
        index = faiss.IndexFlatIP(DIM)
        index.add(x)
        return index

    def ivf(x):
        nlist = max(8, int(np.sqrt(len(x)) / 2))  # >= 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x[: min(len(x), 64 * nlist)])
        index.add(x)
        index.nprobe = max(1, nlist // 16)
        return index

    def hnsw(x):
        index = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 64
        index.add(x)
        return index

    out = {"faiss IndexFlatIP (exact)": flat, "faiss IVFFlat (nprobe=nlist/16)": ivf}
    if n >= 10_000:
        out["faiss HNSW32 (efSearch=64)"] = hnsw
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    peaks = measure_peaks(repeats=args.repeats)
    enc = query_encoding(args.repeats)
    print(f"threads {args.threads}; {describe(peaks)} (median of {args.repeats})")
    print(
        f"query encoding (MiniLM-L6, batch {enc['batch']}, {enc['tokens']} padded tokens): "
        f"{enc['queries_per_s']:.0f} queries/s, {enc['gflops']:.0f} GFLOP/s = {share(enc['gflops'], 'fp32', peaks):.0%} of fp32 peak"
    )
    for n_gallery in (1000, args.gallery):
        rows = search_rows(1000, n_gallery, args.repeats)
        base = rows[0][2]
        print(f"\nsearch 1000 queries x {n_gallery:,} videos, top-{K} (median of {args.repeats})")
        print(f"{'method':34s} {'build s':>9s} {'search ms':>10s} {'vs torch':>9s} {'recall@10':>10s}")
        for name, built, sec, recall in rows:
            print(f"{name:34s} {built:9.3f} {sec * 1e3:10.2f} {base / sec:8.2f}x {recall:10.3f}")


if __name__ == "__main__":
    main()
