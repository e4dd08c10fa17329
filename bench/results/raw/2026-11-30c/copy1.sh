mkdir -p /tmp/xfer && cp .xfer1/* /tmp/xfer/ && ls -la /tmp/xfer
