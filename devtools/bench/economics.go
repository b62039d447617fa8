package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/gwagent/gwagent/azsim"
)

// sendSettings is the [telemetry] lines of a bench device: max_rate = 0
// unless the caller's lines set a budget of their own.
func sendSettings(lines []string) string {
	s := strings.Join(lines, "")
	if !strings.Contains(s, "max_rate") && !strings.Contains(s, "default budget") {
		s = "max_rate = 0\n" + s
	}
	return s
}

// defaultBudget marks a device that keeps the default max_rate.
const defaultBudget = "# default budget\n"

// economics measures living within the hub's limits (issue 19) against an
// S1 × 1 azsim (100 messages/s hub-wide, shaping with a one-second burst
// and a 10 s backlog, 400,000 chunks of 4 KB a day): the quota chunks
// 1,000 readings of 100 bytes cost, packed and unpacked, as the hub counts
// them; and a backlog drained after an outage with the default send budget
// and with none.
func (b *bench) economics(drainN int) ([]row, error) {
	az, info, tel, err := startAzsimTier(filepath.Join(b.dir, "azsim-s1"), 1, "S1")
	if err != nil {
		return nil, err
	}
	defer az.Close()
	defer tel.close()
	var rows []row
	for _, packed := range []bool{true, false} {
		extra := defaultBudget + "pack = true\n"
		if !packed {
			extra = "max_rate = 0\n"
		}
		chunks, msgs, err := b.chunksPer1000(az, info, tel, extra)
		if err != nil {
			return nil, err
		}
		if packed {
			rows = append(rows, row{"quota chunks per 1,000 readings of 100 bytes, pack = true", float64(chunks), "chunks", "<= 40", judge(chunks <= 40),
				fmt.Sprintf("%d messages; S1 hub's own count (4 KB chunks)", msgs)})
		} else {
			rows = append(rows, row{"quota chunks per 1,000 readings of 100 bytes, unpacked", float64(chunks), "chunks", "<= 1000", judge(chunks <= 1000),
				fmt.Sprintf("%d messages", msgs)})
		}
	}
	for _, budget := range []string{defaultBudget, "max_rate = 0\n"} {
		r, err := b.s1Drain(az, info, tel, drainN, budget)
		if err != nil {
			return nil, err
		}
		rows = append(rows, r)
	}
	return rows, nil
}

// chunksPer1000 spools 1,000 readings of 100 bytes into a connected agent
// with the given [telemetry] lines and returns what the hub charged for
// them and in how many messages they came.
func (b *bench) chunksPer1000(az *azsim.Server, info azsim.Info, tel *telemetry, extra string) (chunks int64, msgs int, err error) {
	const n = 1000
	d, reg := b.device(info, az, "1h", "info", extra)
	tel.track(reg)
	cmd, err := b.start(d)
	if err != nil {
		return 0, 0, err
	}
	defer stop(cmd)
	if !waitFor(60*time.Second, func() bool { return tel.count(reg) >= 1 }) {
		return 0, 0, fmt.Errorf("economics: no first message from %s", reg)
	}
	time.Sleep(time.Second) // the twin synchronisation is charged too: let it pass
	before := az.Hub.Limits().Quota.Used
	msgs0 := tel.count(reg)
	spool := filepath.Join(d, "state", "spool")
	for i := range n {
		body := fmt.Sprintf(`{"k":%d,"pad":""}`, i)
		body = fmt.Sprintf(`{"k":%d,"pad":"%s"}`, i, strings.Repeat("x", 100-len(body)))
		p := filepath.Join(spool, fmt.Sprintf("q%05d.json", i))
		os.WriteFile(p+".tmp", []byte(body), 0o644)
		os.Rename(p+".tmp", p)
	}
	if !waitFor(180*time.Second, func() bool { return len(tel.get(reg).keys) >= n }) {
		return 0, 0, fmt.Errorf("economics: %d of %d readings from %s", len(tel.get(reg).keys), n, reg)
	}
	time.Sleep(200 * time.Millisecond)
	return az.Hub.Limits().Quota.Used - before, tel.count(reg) - msgs0, nil
}

// s1Drain queues n readings while the hub refuses the agent, lets it back
// and measures the drain: its rate, and what the hub's throttle did.
func (b *bench) s1Drain(az *azsim.Server, info azsim.Info, tel *telemetry, n int, budget string) (row, error) {
	d, reg := b.device(info, az, "1h", "debug", budget) // debug: the log names every queued file
	tel.track(reg)
	cmd, err := b.start(d)
	if err != nil {
		return row{}, err
	}
	defer stop(cmd)
	if !waitFor(60*time.Second, func() bool { return tel.count(reg) >= 1 }) {
		return row{}, fmt.Errorf("economics: no first message from %s", reg)
	}
	az.Faults.RefuseUntil("hub", time.Now().Add(time.Hour))
	az.Hub.DropAll()
	spool := filepath.Join(d, "state", "spool")
	for i := range n {
		p := filepath.Join(spool, fmt.Sprintf("s%05d.json", i))
		os.WriteFile(p+".tmp", []byte(fmt.Sprintf(`{"k":%d,"drain":true,"pad":%q}`, i, strings.Repeat("x", 60))), 0o644)
		os.Rename(p+".tmp", p)
	}
	logPath := filepath.Join(d, "agent.log")
	if !waitFor(120*time.Second, func() bool {
		b, _ := os.ReadFile(logPath)
		return bytes.Count(b, []byte("spool file queued")) >= n
	}) {
		return row{}, fmt.Errorf("economics: %s did not queue %d spool files", reg, n)
	}
	time.Sleep(10 * time.Second) // the reconnect backoff reaches its ceiling, as after a real outage
	before := len(tel.get(reg).keys)
	lostBefore := countIn(logPath, "hub connection lost")
	back := time.Now()
	az.Faults.RefuseUntil("hub", time.Time{})
	if !waitFor(time.Duration(n)*200*time.Millisecond+120*time.Second, func() bool { return len(tel.get(reg).keys) >= before+n }) {
		return row{}, fmt.Errorf("economics: %d of %d drained from %s", len(tel.get(reg).keys)-before, n, reg)
	}
	st := tel.get(reg)
	first, last := st.arrivals[len(st.arrivals)-n], st.arrivals[len(st.arrivals)-1]
	rate := float64(n) / last.Sub(first).Seconds()
	disconnects := countIn(logPath, "hub connection lost") - lostBefore
	code := lastDisconnect(info, reg)
	name, target, met := fmt.Sprintf("drain of %d queued, S1 × 1 hub, max_rate 10 (default)", n), "<= 10.5", judge(rate <= 10.5)
	if budget != defaultBudget {
		name, target, met = fmt.Sprintf("drain of %d queued, S1 × 1 hub, max_rate 0", n), "", ""
	}
	note := fmt.Sprintf("hub accepts again -> last delivered %.1f s; %d connection(s) lost while draining, last hub disconnect code %d; %d copies",
		last.Sub(back).Seconds(), disconnects, code, st.keyed-len(st.keys))
	if budget != defaultBudget {
		note += "; the hub's rate (100/s after a one-second burst) for the whole fleet"
	}
	return row{name, rate, "msg/s", target, met, note}, nil
}

func countIn(path, s string) int {
	b, _ := os.ReadFile(path)
	return bytes.Count(b, []byte(s))
}

// lastDisconnect is azsim's code for the last time its hub closed the
// device's connection (429002 throttled, 403002 quota); 0 if never.
func lastDisconnect(info azsim.Info, id string) int {
	resp, err := http.Get(info.AdminURL + "/hub/devices/" + id)
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	var v struct {
		LastDisconnect *struct{ ErrorCode int }
	}
	if json.NewDecoder(resp.Body).Decode(&v) != nil || v.LastDisconnect == nil {
		return 0
	}
	return v.LastDisconnect.ErrorCode
}
