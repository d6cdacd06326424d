"""Engine settings: the key-value space kept for shared configuration."""

async def test_engine_settings_survive_a_restart(tmp_path):
    from broker import Broker, BrokerConfig

    cfg = BrokerConfig(data_dir=str(tmp_path / "d"), port=0, http_port=0)
    async with Broker(cfg) as b:
        await b.engine.settings_put("notes/alice", {"rights": ["publish:*"]})
        await b.engine.settings_put("notes/bob", {"rights": []})
        await b.engine.settings_put("webhooks/w", 1)
        await b.engine.settings_delete("notes/bob")
    async with Broker(cfg) as b:
        assert await b.engine.settings_items("notes/") == {"notes/alice": {"rights": ["publish:*"]}}
        assert await b.engine.settings_get("webhooks/w") == 1
        assert await b.engine.settings_get("nothing", "default") == "default"
