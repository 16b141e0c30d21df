import json,sys
d=json.load(open(sys.argv[1]))
print("seconds", d.get("seconds"), "all_ok", d.get("all_ok"))
for k in ("versions","bandwidth"):
    print(k, json.dumps(d.get(k))[:400])
for k in d.get("kernels") or []:
    print("kernel", json.dumps(k)[:200])
for t in d.get("tiny_exact") or []:
    print("tiny", t) if isinstance(t,dict) else print("tiny", t)
if isinstance(d.get("tiny_exact"),dict): print(str(d["tiny_exact"])[-1500:])
for k in ("serve_8b","serve_8b_async","serve_8b_24gb","serve_8b_24gb_async"):
    r=d.get(k)
    if not r: continue
    if "error" in r: print(k,"ERROR",r["error"][-1500:]); continue
    print(k, {x:r.get(x) for x in ("output_tok_s","decode_step_ms","bandwidth_floor_ms","fraction_of_floor","host_ms_per_step","overlapped_host_ms_per_step","ttft_s","itl_s","preemptions","peak_allocated_gib","decode_batch","truncated")})
    if r.get("steady"): print("  steady", r["steady"])
print("a10", json.dumps(d.get("a10"))[:800])
