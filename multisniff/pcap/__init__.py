"""Sans-IO pcap and pcapng: push parsers, block encoders and the timeline merger. Uses nobody."""
