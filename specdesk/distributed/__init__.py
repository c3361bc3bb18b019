"""SpecDesk scaled out on Ray Serve (the optional `specdesk[distributed]` extra).

* `replica.EngineReplica`: one in-process `LLM` per Ray Serve replica, streaming deltas to callers;
* `router.AffinityRouter`: Ray Serve's consistent-hash router, with ring points that survive a replica's
  replacement and a load bound, so a conversation's turns land on the replica holding its pages;
* `remote_llm.RemoteLLM`: the `LLM` interface the app uses, served by those replicas (failover included);
* `frontend.Frontend` and `app.build_app`: the console, `/v1` and `/metrics` as the ingress deployment.

Nothing here is imported by the one-process default (`specdesk.app`): only this package imports ray.
"""
