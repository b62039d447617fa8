package mqttconn_test

// The connection layer against a real azsim (DPS and hub, raw and WebSocket
// listeners, real TLS with client certificates) and a real HTTP proxy
// (tinyproxy), as a gateway behind a site proxy meets them.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/mqttconn"
	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// gateway is one device's onboarding credential against an azsim.
type gateway struct {
	t     *testing.T
	az    *azsimtest.Azsim
	roots *x509.CertPool
	regID string
	cred  provisioning.X509Credential
}

func newGateway(t *testing.T, az *azsimtest.Azsim, regID string) *gateway {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: regID}}, key)
	chainPEM, err := az.Server.FactorySign(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	if err != nil {
		t.Fatal(err)
	}
	var chain []*x509.Certificate
	for blk, rest := pem.Decode(chainPEM); blk != nil; blk, rest = pem.Decode(rest) {
		c, _ := x509.ParseCertificate(blk.Bytes)
		chain = append(chain, c)
	}
	roots, err := tlsconf.LoadPool(az.Info.TrustBundle)
	if err != nil {
		t.Fatal(err)
	}
	return &gateway{t: t, az: az, roots: roots, regID: regID, cred: provisioning.X509Credential{Signer: key, Chain: chain}}
}

// provision registers with DPS over nw, then dials the hub over nw and
// sends one message; it returns the session (closed at the test's end).
func (g *gateway) provision(nw mqttconn.Options) (*transport.Session, error) {
	g.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	op, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	dnw := nw
	dnw.WebSocketPort = g.az.Info.DPSWebSocketPort
	issued, err := provisioning.Obtain(ctx, provisioning.DPSConfig{Endpoint: g.az.Info.DPSAddr, IDScope: g.az.Info.IDScope,
		RegistrationID: g.regID, Roots: g.roots, Credential: g.cred, Timeout: 20 * time.Second, Network: dnw}, op, time.Now(), nil)
	if err != nil {
		return nil, err
	}
	return g.dialHub(ctx, issued.State.AssignedHub, issued.State.DeviceID, op, issued.Chain, nw)
}

// provisionDirect registers over raw MQTT without a proxy, for tests about
// the hub connection.
func (g *gateway) provisionDirect(ctx context.Context) (*provisioning.Issued, *ecdsa.PrivateKey) {
	g.t.Helper()
	op, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	issued, err := provisioning.Obtain(ctx, provisioning.DPSConfig{Endpoint: g.az.Info.DPSAddr, IDScope: g.az.Info.IDScope,
		RegistrationID: g.regID, Roots: g.roots, Credential: g.cred}, op, time.Now(), nil)
	if err != nil {
		g.t.Fatal(err)
	}
	return issued, op
}

func (g *gateway) dialHub(ctx context.Context, host, deviceID string, op *ecdsa.PrivateKey, chain []*x509.Certificate, nw mqttconn.Options) (*transport.Session, error) {
	nw.WebSocketPort = g.az.Info.HubWebSocketPort
	sess, err := transport.Dial(ctx, transport.Config{Host: host, DeviceID: deviceID, Roots: g.roots, Signer: op, Chain: chain, Network: nw})
	if err != nil {
		return nil, err
	}
	g.t.Cleanup(sess.Close)
	body := `{"via":"` + string(sess.Transport()) + `"}`
	if err := sess.SendTelemetry(ctx, []byte(body), nil, nil); err != nil {
		return nil, err
	}
	log, _ := os.ReadFile(g.az.TelemetryLog)
	if !strings.Contains(string(log), deviceID) {
		g.t.Fatalf("the hub logged no message from %s", deviceID)
	}
	return sess, nil
}

// provisioned is a gateway registered with a fresh azsim over raw MQTT,
// ready to dial its hub; ctx bounds the test's dials.
func provisioned(t *testing.T, regID string) (*azsimtest.Azsim, *gateway, context.Context, *provisioning.Issued, *ecdsa.PrivateKey) {
	t.Helper()
	az := azsimtest.Start(t, azsim.Config{})
	g := newGateway(t, az, regID)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	issued, op := g.provisionDirect(ctx)
	return az, g, ctx, issued, op
}

func withCreds(u *url.URL, user, pw string) *url.URL {
	c := *u
	c.User = url.UserPassword(user, pw)
	return &c
}

func ports(ps ...int) []int { return ps }

func portOf(t *testing.T, hostport string) int {
	t.Helper()
	i := strings.LastIndex(hostport, ":")
	p, err := strconv.Atoi(hostport[i+1:])
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestThroughProxy(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	t.Run("ok/websocket through an authenticating proxy: X.509 over the WebSocket's TLS", func(t *testing.T) {
		px := testenv.StartTinyproxy(t, testenv.ProxyOpts{User: "gw", Password: "s3cret-pw"})
		g := newGateway(t, az, "ws-auth")
		sess, err := g.provision(mqttconn.Options{Transport: mqttconn.WebSocket, Proxy: mqttconn.Proxy(withCreds(px.URL, "gw", "s3cret-pw"), "")})
		if err != nil {
			t.Fatal(err)
		}
		if sess.Transport() != mqttconn.WebSocket {
			t.Fatalf("transport %q", sess.Transport())
		}
		for _, p := range []int{az.Info.DPSWebSocketPort, az.Info.HubWebSocketPort} {
			if !strings.Contains(px.Log(), "127.0.0.1:"+strconv.Itoa(p)) && !strings.Contains(px.Log(), "localhost:"+strconv.Itoa(p)) {
				t.Fatalf("the proxy logged no tunnel to port %d:\n%s", p, px.Log())
			}
		}
	})
	t.Run("ok/raw MQTT through a proxy without authentication", func(t *testing.T) {
		px := testenv.StartTinyproxy(t, testenv.ProxyOpts{})
		g := newGateway(t, az, "mqtt-open")
		sess, err := g.provision(mqttconn.Options{Transport: mqttconn.MQTT, Proxy: mqttconn.Proxy(px.URL, "")})
		if err != nil {
			t.Fatal(err)
		}
		if sess.Transport() != mqttconn.MQTT {
			t.Fatalf("transport %q", sess.Transport())
		}
		if !strings.Contains(px.Log(), strconv.Itoa(portOf(t, az.Info.DPSAddr))) {
			t.Fatalf("the proxy logged no tunnel to DPS:\n%s", px.Log())
		}
	})
	t.Run("ok/auto falls back to WebSockets behind a proxy that allows only the WebSocket port", func(t *testing.T) {
		// The rule under test is "CONNECT only to the WebSocket port" (443 on
		// a real site); azsim's WebSocket ports stand in for 443.
		px := testenv.StartTinyproxy(t, testenv.ProxyOpts{ConnectPorts: ports(az.Info.DPSWebSocketPort, az.Info.HubWebSocketPort)})
		g := newGateway(t, az, "auto-fallback")
		sess, err := g.provision(mqttconn.Options{Transport: mqttconn.Auto, Proxy: mqttconn.Proxy(px.URL, "")})
		if err != nil {
			t.Fatal(err)
		}
		if sess.Transport() != mqttconn.WebSocket {
			t.Fatalf("transport %q, want websocket", sess.Transport())
		}
	})
	t.Run("ok/DPS over HTTPS through the same proxy rules", func(t *testing.T) {
		httpsPort := portOf(t, az.Info.DPSHTTPSAddr)
		px := testenv.StartTinyproxy(t, testenv.ProxyOpts{User: "gw", Password: "pw-https", ConnectPorts: ports(httpsPort)})
		g := newGateway(t, az, "https-proxied")
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		op, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
		issued, err := provisioning.Obtain(ctx, provisioning.DPSConfig{Endpoint: az.Info.DPSHTTPSAddr, Transport: provisioning.TransportHTTPS,
			IDScope: az.Info.IDScope, RegistrationID: g.regID, Roots: g.roots, Credential: g.cred, Timeout: 20 * time.Second,
			Network: mqttconn.Options{Proxy: mqttconn.Proxy(withCreds(px.URL, "gw", "pw-https"), "")}}, op, time.Now(), nil)
		if err != nil {
			t.Fatal(err)
		}
		if issued.State.DeviceID != g.regID || !strings.Contains(px.Log(), ":"+strconv.Itoa(httpsPort)+" HTTP/1.1") {
			t.Fatalf("device %q; proxy log:\n%s", issued.State.DeviceID, px.Log())
		}
	})
	t.Run("ok/no_proxy sends a local hub past a dead proxy", func(t *testing.T) {
		px := testenv.StartTinyproxy(t, testenv.ProxyOpts{})
		px.Stop()
		g := newGateway(t, az, "no-proxy")
		sess, err := g.provision(mqttconn.Options{Transport: mqttconn.MQTT, Proxy: mqttconn.Proxy(px.URL, "example.com, localhost")})
		if err != nil {
			t.Fatal(err)
		}
		if sess.Transport() != mqttconn.MQTT {
			t.Fatalf("transport %q", sess.Transport())
		}
	})
}

func TestProxyRefusals(t *testing.T) {
	az, g, ctx, issued, op := provisioned(t, "refused")
	dial := func(nw mqttconn.Options) error {
		_, err := g.dialHub(ctx, issued.State.AssignedHub, issued.State.DeviceID, op, issued.Chain, nw)
		return err
	}
	authed := testenv.StartTinyproxy(t, testenv.ProxyOpts{User: "gw", Password: "right-pw"})
	only443 := testenv.StartTinyproxy(t, testenv.ProxyOpts{ConnectPorts: ports(az.Info.HubWebSocketPort)})
	dead := testenv.StartTinyproxy(t, testenv.ProxyOpts{})
	dead.Stop()

	for _, tc := range []struct {
		name  string
		nw    mqttconn.Options
		proxy string
		want  []string
	}{
		{"fail/wrong password is 407, named, without the password",
			mqttconn.Options{Transport: mqttconn.WebSocket, Proxy: mqttconn.Proxy(withCreds(authed.URL, "gw", "wrong-pw"), "")},
			authed.Addr, []string{"user name and password", "gw:xxxxx@" + authed.Addr}},
		{"fail/no credentials is 407",
			mqttconn.Options{Transport: mqttconn.MQTT, Proxy: mqttconn.Proxy(authed.URL, "")},
			authed.Addr, []string{"407", "user name and password"}},
		{"fail/port not allowed is 403 with advice",
			mqttconn.Options{Transport: mqttconn.MQTT, Proxy: mqttconn.Proxy(only443.URL, "")},
			only443.Addr, []string{"403", "websocket"}},
		{"fail/auto: refused proxy credentials are not worth a fallback",
			mqttconn.Options{Transport: mqttconn.Auto, Proxy: mqttconn.Proxy(withCreds(authed.URL, "gw", "wrong-pw"), "")},
			authed.Addr, []string{"user name and password"}},
		{"fail/dead proxy is unreachable, named",
			mqttconn.Options{Transport: mqttconn.Auto, Proxy: mqttconn.Proxy(withCreds(dead.URL, "gw", "dead-pw"), "")},
			dead.Addr, []string{"unreachable"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := dial(tc.nw)
			if err == nil {
				t.Fatal("connected")
			}
			if !errors.Is(err, mqttconn.ErrProxy) {
				t.Fatalf("not a proxy error: %v", err)
			}
			msg := err.Error()
			for _, w := range append(tc.want, tc.proxy) {
				if !strings.Contains(msg, w) {
					t.Errorf("error lacks %q: %s", w, msg)
				}
			}
			if strings.Contains(msg, "-pw") {
				t.Errorf("error shows the proxy password: %s", msg)
			}
			if strings.Contains(tc.name, "auto") && strings.Contains(msg, "WebSockets") {
				t.Errorf("auto fell back after a 407: %s", msg)
			}
		})
	}

	t.Run("ok/a proxy that dies and returns", func(t *testing.T) {
		px := testenv.StartTinyproxy(t, testenv.ProxyOpts{})
		nw := mqttconn.Options{Transport: mqttconn.WebSocket, Proxy: mqttconn.Proxy(px.URL, "")}
		if err := dial(nw); err != nil {
			t.Fatal(err)
		}
		px.Stop()
		if err := dial(nw); !errors.Is(err, mqttconn.ErrProxy) {
			t.Fatalf("with the proxy down: %v", err)
		}
		px.Start()
		if err := dial(nw); err != nil {
			t.Fatalf("after the proxy returned: %v", err)
		}
	})
}

// Auto's first attempt runs into a silent server (a firewall that accepts
// and then drops, or a blackhole) and uses up its whole share of the time;
// the WebSocket attempt after it must still get its CONNACK: paho's connect
// timeout covers both attempts.
func TestAutoAfterSilentMQTT(t *testing.T) {
	_, g, ctx, issued, op := provisioned(t, "silent-8883")
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			defer c.Close() // accepted, never answered
		}
	}()
	host := "localhost:" + strconv.Itoa(silent.Addr().(*net.TCPAddr).Port)
	sess, err := g.dialHub(ctx, host, issued.State.DeviceID, op, issued.Chain,
		mqttconn.Options{Transport: mqttconn.Auto, Timeout: 3 * time.Second, FallbackTimeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if sess.Transport() != mqttconn.WebSocket {
		t.Fatalf("transport %q", sess.Transport())
	}
}

// A quiet session outlives the keep-alive against the hub's real MQTT
// broker, which drops a client it has not heard from for one and a half
// keep-alives: the connection pings in paho's place (keepalive.go), over
// either transport.
func TestKeepAliveHoldsAQuietSession(t *testing.T) {
	az, g, ctx, issued, op := provisioned(t, "quiet")
	const every = 2 * time.Second
	for _, tr := range []mqttconn.Transport{mqttconn.MQTT, mqttconn.WebSocket} {
		sess, err := transport.Dial(ctx, transport.Config{Host: issued.State.AssignedHub, DeviceID: issued.State.DeviceID,
			Roots: g.roots, Signer: op, Chain: issued.Chain, KeepAlive: every,
			Network: mqttconn.Options{Transport: tr, WebSocketPort: az.Info.HubWebSocketPort}})
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-sess.Done():
			t.Fatalf("%s: the quiet session ended: %v", tr, sess.Err())
		case <-time.After(3 * every):
		}
		if err := sess.SendTelemetry(ctx, []byte(`{"after":"quiet"}`), nil, nil); err != nil {
			t.Fatalf("%s: after %s of quiet: %v", tr, 3*every, err)
		}
		sess.Close()
	}
}
