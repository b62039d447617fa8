package agent_test

// A gateway behind a site proxy that allows CONNECT only to the WebSocket
// port (443 on a real site; azsim's WebSocket ports stand in for it here,
// while 8883's stand-in, azsim's raw ports, stay forbidden): provisioning,
// telemetry, renewal with file, TPM and PKCS#11 keys, the auto fallback and
// what is remembered across a restart. Real tinyproxy, real azsim.

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/keystore/pkcs11"
)

// onlyWebSockets is a proxy with a password that tunnels only to azsim's
// WebSocket ports.
func onlyWebSockets(t *testing.T, az *azsimtest.Azsim) *testenv.Proxy {
	return testenv.StartTinyproxy(t, testenv.ProxyOpts{User: "site", Password: "pw-Xy7",
		ConnectPorts: []int{az.Info.DPSWebSocketPort, az.Info.HubWebSocketPort}})
}

func networkTOML(az *azsimtest.Azsim, transport, proxy string) string {
	return fmt.Sprintf("\n[network]\ntransport = %q\nproxy = %q\ndps_websocket_port = %d\nhub_websocket_port = %d\n",
		transport, proxy, az.Info.DPSWebSocketPort, az.Info.HubWebSocketPort)
}

func proxyURL(p *testenv.Proxy, user, pw string) string {
	return "http://" + user + ":" + pw + "@" + p.Addr
}

// tunnels counts the CONNECT requests the proxy logged to a port.
func tunnels(p *testenv.Proxy, port int) int {
	return strings.Count(p.Log(), ":"+strconv.Itoa(port)+" HTTP/1.1")
}

func hubPort(t *testing.T, az *azsimtest.Azsim) int {
	i := strings.LastIndex(az.Info.HubHostName, ":")
	p, err := strconv.Atoi(az.Info.HubHostName[i+1:])
	if err != nil {
		t.Fatalf("hub host name %q has no port", az.Info.HubHostName)
	}
	return p
}

func TestBehindProxyRenewsOverWebSockets(t *testing.T) {
	// Certificates are issued and renewed in a time the test moves
	// (fakeAzsim), one renewal per device.
	ft, az := fakeAzsim(t, azsim.Config{CertLifetime: 12 * time.Second})
	px := onlyWebSockets(t, az)
	for _, be := range []string{"file", "tpm", "pkcs11"} {
		t.Run("ok/"+be, func(t *testing.T) {
			o := devOpts{regID: "gw-ws-" + be, extra: fastRenewal + networkTOML(az, "websocket", proxyURL(px, "site", "pw-Xy7"))}
			switch be {
			case "tpm":
				sw := testenv.StartSWTPM(t)
				dir := t.TempDir()
				o.onKey = "tpm2:socket=" + sw.Sock + ";blob=" + filepath.Join(dir, "onboarding.tpmkey")
				o.opKey = "tpm2:socket=" + sw.Sock + ";blob=" + filepath.Join(dir, "op.tpmkey")
			case "pkcs11":
				if !pkcs11.Supported {
					t.Skip("this build has no PKCS#11 (nopkcs11 or CGO_ENABLED=0); make test uses the full build")
				}
				h := testenv.StartSoftHSM(t, "gw", "1357")
				o.onKey, o.opKey = h.URI("onboarding"), h.URI("operational")
			}
			d := newDevice(t, az, o)
			d.clock = ft
			ft.Allow(3 * time.Second)
			d.start()
			testenv.Eventually(t, 30*time.Second, "connected over WebSockets", func() bool {
				st := d.status()
				return st.State == "connected" && st.Transport == "websocket"
			})
			first := d.current()
			allowRenewal(ft, first, 0.5)
			testenv.Eventually(t, 20*time.Second, "a certificate renewed through the hub", func() bool {
				s, err := storeCurrent(d)
				return err == nil && s.Serial != first.Serial
			})
			if via := d.current().Via; via != "hub" {
				t.Fatalf("renewed via %q, want hub", via)
			}
			spoolPut(t, d.cfg.Telemetry.SpoolDir, "ws.json", []byte(`{"overWebSockets":1}`))
			testenv.Eventually(t, 15*time.Second, "a message after the renewal", func() bool {
				return countBodies(az, o.regID, "overWebSockets") == 1
			})
			if tunnels(px, az.Info.HubWebSocketPort) == 0 || tunnels(px, az.Info.DPSWebSocketPort) == 0 {
				t.Fatalf("the proxy tunnelled nothing to the WebSocket ports:\n%s", px.Log())
			}
		})
	}
}

func TestAutoFallsBackAndRemembers(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	px := onlyWebSockets(t, az)
	raw := hubPort(t, az)
	d := newDevice(t, az, devOpts{regID: "gw-auto", extra: networkTOML(az, "auto", proxyURL(px, "site", "pw-Xy7"))})
	r := d.start()
	testenv.Eventually(t, 30*time.Second, "connected over WebSockets after 8883 was refused", func() bool {
		st := d.status()
		return st.State == "connected" && st.Transport == "websocket"
	})
	if tunnels(px, raw) == 0 {
		t.Fatalf("auto did not try the raw MQTT port first:\n%s", px.Log())
	}
	b, err := os.ReadFile(filepath.Join(d.cfg.StateDir, "transport.json"))
	if err != nil || !strings.Contains(string(b), `"websocket"`) {
		t.Fatalf("transport.json: %s, %v", b, err)
	}
	if line := d.status(); !strings.Contains(healthOrLine(line), "over websocket") {
		t.Fatalf("status line %q does not name the transport", healthOrLine(line))
	}
	r.stop()

	// After a restart WebSockets is tried first: no new tunnel to 8883.
	before := tunnels(px, raw)
	d.start()
	testenv.Eventually(t, 30*time.Second, "connected again over WebSockets", func() bool {
		st := d.status()
		return st.State == "connected" && st.Transport == "websocket"
	})
	if n := tunnels(px, raw); n != before {
		t.Fatalf("after the restart auto tried 8883 again (%d more tunnels) instead of preferring WebSockets", n-before)
	}
}

// While a session runs over WebSockets, the site opens 8883: the agent
// notices at its next re-probe, beside the running session (the proxy keeps
// the open tunnel), and reconnects over MQTT.
func TestAutoReturnsToMQTT(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	px := onlyWebSockets(t, az)
	d := newDevice(t, az, devOpts{regID: "gw-reprobe", extra: networkTOML(az, "auto", proxyURL(px, "site", "pw-Xy7")) + "mqtt_reprobe = \"10m\"\n"})
	// The re-probe runs on the agent's clock, which the test moves.
	ft := testenv.StartFakeTime(t, time.Now())
	ft.Allow(5 * time.Second)
	d.clock = ft
	r := d.start()
	testenv.Eventually(t, 30*time.Second, "connected over WebSockets", func() bool {
		st := d.status()
		return st.State == "connected" && st.Transport == "websocket"
	})
	px.Reload(testenv.ProxyOpts{User: "site", Password: "pw-Xy7"}) // every port
	if strings.Contains(r.log.String(), "port 8883 is reachable again") {
		t.Fatal("re-probed before mqtt_reprobe had passed")
	}
	ft.Allow(11 * time.Minute)
	testenv.Eventually(t, 30*time.Second, "back on MQTT", func() bool {
		st := d.status()
		return st.State == "connected" && st.Transport == "mqtt"
	})
	if !strings.Contains(r.log.String(), "port 8883 is reachable again") {
		t.Fatal("the switch was not the re-probe's doing")
	}
	if _, err := os.Stat(filepath.Join(d.cfg.StateDir, "transport.json")); !os.IsNotExist(err) {
		t.Fatalf("WebSockets still remembered: %v", err)
	}
}

func healthOrLine(st interface{ Line() string }) string { return st.Line() }

// Changing the transport in the config reconnects over the new one.
func TestNetworkReload(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: "gw-reload-net", extra: networkTOML(az, "mqtt", "")})
	d.start()
	testenv.Eventually(t, 30*time.Second, "connected over MQTT", func() bool {
		st := d.status()
		return st.State == "connected" && st.Transport == "mqtt"
	})
	raw, _ := os.ReadFile(d.path)
	next := strings.Replace(string(raw), `transport = "mqtt"`, `transport = "websocket"`, 1)
	tmp := d.path + ".new"
	os.WriteFile(tmp, []byte(next), 0o600)
	os.Rename(tmp, d.path)
	testenv.Eventually(t, 30*time.Second, "reconnected over WebSockets", func() bool {
		st := d.status()
		return st.State == "connected" && st.Transport == "websocket"
	})
}

// The proxy from the environment (https_proxy, no_proxy): set for the whole
// process, so this test runs alone.
func TestNetworkFromEnvironment(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	t.Run("ok/https_proxy from the environment, no_proxy for the local hub", func(t *testing.T) {
		dead := testenv.StartTinyproxy(t, testenv.ProxyOpts{})
		dead.Stop()
		t.Setenv("https_proxy", "http://u:env-pw@"+dead.Addr)
		t.Setenv("no_proxy", "localhost")
		d := newDevice(t, az, devOpts{regID: "gw-noproxy", extra: networkTOML(az, "mqtt", "")})
		d.start()
		testenv.Eventually(t, 30*time.Second, "connected directly", func() bool { return d.status().State == "connected" })
	})
	t.Run("fail/https_proxy that is down: backs off with a clear error, no password", func(t *testing.T) {
		dead := testenv.StartTinyproxy(t, testenv.ProxyOpts{})
		dead.Stop()
		t.Setenv("https_proxy", "http://u:env-pw@"+dead.Addr)
		t.Setenv("no_proxy", "")
		d := newDevice(t, az, devOpts{regID: "gw-deadproxy", extra: networkTOML(az, "auto", "")})
		// Registration retries until its timeout (30 s in the device's
		// config): 2 s are enough to see how a dead proxy fails.
		d.cfg.Identity.ProvisioningTimeout.Duration = 2 * time.Second
		if _, err := d.provision(); err == nil || !strings.Contains(err.Error(), dead.Addr) || strings.Contains(err.Error(), "env-pw") {
			t.Fatalf("provisioning through a dead proxy: %v", err)
		}
		// The proxy returns: the agent gets through on a later attempt.
		dead.Start()
		d.start()
		testenv.Eventually(t, 60*time.Second, "connected once the proxy is back", func() bool { return d.status().State == "connected" })
		st, _ := json.Marshal(d.status())
		if strings.Contains(string(st), "env-pw") {
			t.Fatalf("status shows the proxy password: %s", st)
		}
	})
}

// Twin, methods, the outbox across an outage and reconnects behave over
// WebSockets through a proxy as they do over MQTT.
func TestOverWebSocketsLikeMQTT(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	px := onlyWebSockets(t, az)
	d := newDevice(t, az, devOpts{regID: "gw-ws-all", extra: networkTOML(az, "websocket", proxyURL(px, "site", "pw-Xy7"))})
	d.start()
	testenv.Eventually(t, 30*time.Second, "connected over WebSockets", func() bool {
		st := d.status()
		return st.State == "connected" && st.Transport == "websocket"
	})
	var tw struct {
		Reported map[string]any `json:"reported"`
	}
	testenv.Eventually(t, 10*time.Second, "the twin's reported certificate", func() bool {
		az.Admin("GET", "/hub/devices/gw-ws-all/twin", nil, &tw)
		return tw.Reported["certificate"] != nil
	})
	var res struct {
		Status  int            `json:"status"`
		Payload map[string]any `json:"payload"`
	}
	if st := az.Admin("POST", "/hub/devices/gw-ws-all/methods/ping?timeout=10", "{}", &res); st != 200 || res.Status != 200 || res.Payload["pong"] != true {
		t.Fatalf("ping over WebSockets: http %d, %+v", st, res)
	}
	az.Admin("POST", "/faults/refuse", map[string]any{"target": "hub", "seconds": 2}, nil)
	az.Admin("POST", "/faults/drop", map[string]any{"target": "hub"}, nil)
	for i := range 20 {
		p := filepath.Join(d.cfg.Telemetry.SpoolDir, fmt.Sprintf("out%02d.json", i))
		os.WriteFile(p+".tmp", []byte(fmt.Sprintf(`{"wsOutage":%d}`, i)), 0o644)
		os.Rename(p+".tmp", p)
	}
	testenv.Eventually(t, 30*time.Second, "all 20 messages after the outage", func() bool {
		return countBodies(az, "gw-ws-all", "wsOutage") >= 20
	})
	if n := countBodies(az, "gw-ws-all", "wsOutage"); n != 20 {
		t.Errorf("the hub got %d messages, want exactly 20", n)
	}
	if st := d.status(); st.Transport != "websocket" {
		t.Fatalf("reconnected over %q", st.Transport)
	}
}
