package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// transports: the same outbox drain over raw MQTT and over MQTT over
// WebSockets (issue 13), with the agent's memory after each. 3,000 messages
// are queued while the hub refuses connections, then drained.
func (b *bench) transports() ([]row, error) {
	const total = 3000
	var rows []row
	for _, tr := range []string{"mqtt", "websocket"} {
		d, reg := b.device(b.info, b.az, "1h", "debug")
		b.tel.track(reg)
		f, err := os.OpenFile(filepath.Join(d, "gwagent.toml"), os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			return nil, err
		}
		fmt.Fprintf(f, "[network]\ntransport = %q\ndps_websocket_port = %d\nhub_websocket_port = %d\n", tr, b.info.DPSWebSocketPort, b.info.HubWebSocketPort)
		f.Close()
		cmd, err := b.start(d)
		if err != nil {
			return nil, err
		}
		if !waitFor(60*time.Second, func() bool { return b.tel.count(reg) >= 1 }) {
			stop(cmd)
			return nil, fmt.Errorf("transports %s: no telemetry", tr)
		}
		b.az.Faults.RefuseUntil("hub", time.Now().Add(time.Hour))
		b.az.Hub.DropAll()
		spool := filepath.Join(d, "state", "spool")
		for i := 0; i < total; i++ {
			p := filepath.Join(spool, fmt.Sprintf("t%05d.json", i))
			os.WriteFile(p+".tmp", []byte(fmt.Sprintf(`{"k":%d,"via":true,"pad":"0123456789abcdef0123456789abcdef"}`, i)), 0o644)
			os.Rename(p+".tmp", p)
		}
		log := filepath.Join(d, "agent.log")
		waitFor(120*time.Second, func() bool {
			b, _ := os.ReadFile(log)
			return strings.Count(string(b), "spool file queued") >= total
		})
		before := b.tel.count(reg)
		b.az.Faults.RefuseUntil("hub", time.Time{})
		ok := waitFor(300*time.Second, func() bool { return b.tel.count(reg) >= before+total })
		pid := cmd.Process.Pid
		rss, hwm := procField(pid, "status", "VmRSS")/1024, procField(pid, "status", "VmHWM")/1024
		stop(cmd)
		st := b.tel.get(reg)
		n := st.n - before
		if !ok {
			return nil, fmt.Errorf("transports %s: only %d of %d messages arrived", tr, n, total)
		}
		first, last := st.arrivals[before], st.arrivals[before+total-1]
		rows = append(rows,
			row{"drain over " + tr + ", 3,000 queued", float64(total) / last.Sub(first).Seconds(), "msg/s", "", "", "first to last arrival at the hub"},
			row{"RSS after the drain over " + tr, rss, "MiB", "", "", fmt.Sprintf("peak %.1f", hwm)})
	}
	return rows, nil
}
