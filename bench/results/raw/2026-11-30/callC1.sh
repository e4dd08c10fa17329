mkdir -p /tmp/xfer && cp .xfer1/* /tmp/xfer/ && ls -la /tmp/xfer && df -h /tmp | tail -1
