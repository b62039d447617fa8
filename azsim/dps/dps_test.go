package dps_test

// DPS driven by a plain paho client (not gwagent's provisioning package, so
// the two cannot share a misunderstanding of the protocol).

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/dps"
)

type reply struct {
	status int
	query  url.Values
	body   map[string]any
}

type client struct {
	t   *testing.T
	c   paho.Client
	got chan reply
}

// connect dials DPS as regID; cert may be nil (then password is used).
func connect(t *testing.T, az *azsimtest.Azsim, regID, apiVersion string, cert *tls.Certificate, password string) (*client, error) {
	t.Helper()
	pool := x509.NewCertPool()
	b, _ := os.ReadFile(az.Info.TrustBundle)
	pool.AppendCertsFromPEM(b)
	tc := &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
	if cert != nil {
		// DPS names CAs in its CertificateRequest that are not the
		// device's: a static Certificates list would send nothing.
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
	}
	return dial(t, az, regID, apiVersion, tc, password)
}

func dial(t *testing.T, az *azsimtest.Azsim, regID, apiVersion string, tc *tls.Config, password string) (*client, error) {
	t.Helper()
	cl := &client{t: t, got: make(chan reply, 8)}
	opts := paho.NewClientOptions().AddBroker("tls://" + az.Info.DPSAddr).SetClientID(regID).
		SetUsername(az.Info.IDScope + "/registrations/" + regID + "/api-version=" + apiVersion + "&ClientVersion=paho-test").
		SetPassword(password).SetTLSConfig(tc).SetProtocolVersion(4).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	cl.c = paho.NewClient(opts)
	if tok := cl.c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		return nil, fmt.Errorf("connect: %v", tok.Error())
	}
	t.Cleanup(func() { cl.c.Disconnect(0) })
	tok := cl.c.Subscribe("$dps/registrations/res/#", 1, func(_ paho.Client, m paho.Message) {
		rest := strings.TrimPrefix(m.Topic(), "$dps/registrations/res/")
		st, q, _ := strings.Cut(rest, "/?")
		r := reply{query: map[string][]string{}}
		r.status, _ = strconv.Atoi(st)
		r.query, _ = url.ParseQuery(q)
		json.Unmarshal(m.Payload(), &r.body)
		cl.got <- r
	})
	tok.WaitTimeout(5 * time.Second)
	return cl, nil
}

func (c *client) request(topic string, body any) reply {
	c.t.Helper()
	var b []byte
	if body != nil {
		b, _ = json.Marshal(body)
	}
	c.c.Publish(topic, 1, false, b).WaitTimeout(5 * time.Second)
	select {
	case r := <-c.got:
		return r
	case <-time.After(10 * time.Second):
		c.t.Fatalf("no answer to %s", topic)
	}
	return reply{}
}

// register runs the whole flow and returns the final reply.
func (c *client) register(body any) reply {
	c.t.Helper()
	r := c.request("$dps/registrations/PUT/iotdps-register/?$rid=1", body)
	for r.status == 202 {
		ra, _ := strconv.Atoi(r.query.Get("retry-after"))
		time.Sleep(time.Duration(ra) * time.Second)
		r = c.request("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId="+r.body["operationId"].(string), nil)
	}
	return r
}

func csrFor(t *testing.T, key crypto.Signer, cn string) string {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(der)
}

// onboarding returns a factory-signed TLS certificate for regID.
func onboarding(t *testing.T, az *azsimtest.Azsim, regID string) *tls.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: regID}}, key)
	chainPEM, err := az.Server.FactorySign(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	if err != nil {
		t.Fatal(err)
	}
	c := &tls.Certificate{PrivateKey: key}
	for blk, rest := pem.Decode(chainPEM); blk != nil; blk, rest = pem.Decode(rest) {
		c.Certificate = append(c.Certificate, blk.Bytes)
	}
	return c
}

func sas(scope, regID, deviceKey string, exp time.Time) string {
	return sasSkn(scope, regID, deviceKey, exp, "&skn=registration")
}

// sasSkn builds a DPS SAS token ending in skn (e.g. "&skn=registration", or
// "" for none, as Microsoft's Python SDK sends it).
func sasSkn(scope, regID, deviceKey string, exp time.Time, skn string) string {
	sr := url.QueryEscape(scope + "/registrations/" + regID)
	k, _ := base64.StdEncoding.DecodeString(deviceKey)
	m := hmac.New(sha256.New, k)
	fmt.Fprintf(m, "%s\n%d", sr, exp.Unix())
	return "SharedAccessSignature sr=" + sr + "&sig=" + url.QueryEscape(base64.StdEncoding.EncodeToString(m.Sum(nil))) +
		"&se=" + strconv.FormatInt(exp.Unix(), 10) + skn
}

const certAPI = "2025-07-01-preview"

func TestDPS(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)

	t.Run("ok/x509 group with a P-384 CSR returns the chain", func(t *testing.T) {
		c, err := connect(t, az, "dev-x1", certAPI, onboarding(t, az, "dev-x1"), "")
		if err != nil {
			t.Fatal(err)
		}
		r := c.register(map[string]any{"registrationId": "dev-x1", "csr": csrFor(t, p384, "dev-x1")})
		st, _ := r.body["registrationState"].(map[string]any)
		if r.status != 200 || r.body["status"] != "assigned" || st["assignedHub"] != az.Info.HubHostName || st["deviceId"] != "dev-x1" {
			t.Fatalf("reply %d %v", r.status, r.body)
		}
		chain, _ := st["issuedCertificateChain"].([]any)
		if len(chain) != 3 {
			t.Fatalf("chain of %d", len(chain))
		}
		der, _ := base64.StdEncoding.DecodeString(chain[0].(string))
		leaf, err := x509.ParseCertificate(der)
		if err != nil || leaf.Subject.CommonName != "dev-x1" || !leaf.PublicKey.(*ecdsa.PublicKey).Equal(&p384.PublicKey) {
			t.Fatalf("leaf %v %v", err, leaf.Subject)
		}
	})
	t.Run("ok/older api-version or no csr: no chain", func(t *testing.T) {
		c, _ := connect(t, az, "dev-x2", "2019-03-31", onboarding(t, az, "dev-x2"), "")
		r := c.register(map[string]any{"csr": csrFor(t, p384, "dev-x2")})
		st, _ := r.body["registrationState"].(map[string]any)
		if r.status != 200 || st["issuedCertificateChain"] != nil {
			t.Fatalf("reply %d %v", r.status, r.body)
		}
	})
	t.Run("ok/symmetric-key group, registration id case-insensitive", func(t *testing.T) {
		var k struct{ DeviceKey string }
		az.Admin("GET", "/dps/derive-key?group="+azsim.SymmetricKeyGroup+"&registrationId=dev-s1", nil, &k)
		c, _ := connect(t, az, "dev-s1", certAPI, nil, sas(az.Info.IDScope, "dev-s1", k.DeviceKey, time.Now().Add(time.Hour)))
		if r := c.register(map[string]any{"registrationId": "DEV-S1"}); r.status != 200 || r.body["status"] != "assigned" {
			t.Fatalf("reply %d %v", r.status, r.body)
		}
	})

	t.Run("ok/symmetric-key SAS without skn, as the Python SDK sends it", func(t *testing.T) {
		var k struct{ DeviceKey string }
		az.Admin("GET", "/dps/derive-key?group="+azsim.SymmetricKeyGroup+"&registrationId=dev-s2", nil, &k)
		c, _ := connect(t, az, "dev-s2", certAPI, nil, sasSkn(az.Info.IDScope, "dev-s2", k.DeviceKey, time.Now().Add(time.Hour), ""))
		if r := c.register(map[string]any{"registrationId": "dev-s2"}); r.status != 200 || r.body["status"] != "assigned" {
			t.Fatalf("reply %d %v", r.status, r.body)
		}
	})

	bad := []struct {
		name   string
		regID  string
		cert   bool
		pass   func() string
		body   func() any
		status int
		msg    string
	}{
		{"fail/csr with PEM armour", "dev-b1", true, nil, func() any {
			return map[string]any{"csr": "-----BEGIN CERTIFICATE REQUEST-----\nMII=\n-----END CERTIFICATE REQUEST-----"}
		}, 400, "PEM"},
		{"fail/RSA csr", "dev-b2", true, nil, func() any {
			rk, _ := rsa.GenerateKey(rand.Reader, 2048)
			return map[string]any{"csr": csrFor(t, rk, "dev-b2")}
		}, 400, "EC"},
		{"fail/P-256 csr", "dev-b3", true, nil, func() any {
			k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			return map[string]any{"csr": csrFor(t, k, "dev-b3")}
		}, 400, "P-384"},
		{"fail/csr CN differs", "dev-b4", true, nil, func() any {
			return map[string]any{"csr": csrFor(t, p384, "someone-else")}
		}, 400, "CN"},
		{"fail/bad SAS signature", "dev-b5", false, func() string {
			return sas(az.Info.IDScope, "dev-b5", base64.StdEncoding.EncodeToString([]byte("not-the-derived-key-0123456789")), time.Now().Add(time.Hour))
		}, func() any { return map[string]any{} }, 401, "signature"},
		{"fail/expired SAS", "dev-b6", false, func() string {
			var k struct{ DeviceKey string }
			az.Admin("GET", "/dps/derive-key?group="+azsim.SymmetricKeyGroup+"&registrationId=dev-b6", nil, &k)
			return sas(az.Info.IDScope, "dev-b6", k.DeviceKey, time.Now().Add(-time.Minute))
		}, func() any { return map[string]any{} }, 401, "expired"},
		{"fail/SAS naming a service policy", "dev-b7", false, func() string {
			var k struct{ DeviceKey string }
			az.Admin("GET", "/dps/derive-key?group="+azsim.SymmetricKeyGroup+"&registrationId=dev-b7", nil, &k)
			return sasSkn(az.Info.IDScope, "dev-b7", k.DeviceKey, time.Now().Add(time.Hour), "&skn=provisioningserviceowner")
		}, func() any { return map[string]any{} }, 401, "skn"},
		{"fail/SAS with two skn", "dev-b8", false, func() string {
			var k struct{ DeviceKey string }
			az.Admin("GET", "/dps/derive-key?group="+azsim.SymmetricKeyGroup+"&registrationId=dev-b8", nil, &k)
			return sasSkn(az.Info.IDScope, "dev-b8", k.DeviceKey, time.Now().Add(time.Hour), "&skn=registration&skn=other")
		}, func() any { return map[string]any{} }, 401, "skn"},
	}
	for _, b := range bad {
		t.Run(b.name, func(t *testing.T) {
			var cert *tls.Certificate
			pass := ""
			if b.cert {
				cert = onboarding(t, az, b.regID)
			} else {
				pass = b.pass()
			}
			c, err := connect(t, az, b.regID, certAPI, cert, pass)
			if err != nil {
				t.Fatal(err)
			}
			r := c.register(b.body())
			if r.status != b.status || !strings.Contains(fmt.Sprint(r.body["message"]), b.msg) {
				t.Fatalf("got %d %v, want %d mentioning %q", r.status, r.body, b.status, b.msg)
			}
			if code, _ := r.body["errorCode"].(float64); int(code)/1000 != b.status {
				t.Fatalf("errorCode %v does not match status %d", r.body["errorCode"], b.status)
			}
		})
	}
	t.Run("fail/certificate from a foreign CA", func(t *testing.T) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big1(), Subject: pkix.Name{CommonName: "dev-f1"}, NotBefore: time.Now().Add(-time.Hour),
			NotAfter: time.Now().Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
		der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		c, _ := connect(t, az, "dev-f1", certAPI, &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, "")
		if r := c.register(map[string]any{}); r.status != 401 {
			t.Fatalf("got %d %v", r.status, r.body)
		}
	})
	t.Run("ok/disabled enrollment answers status disabled", func(t *testing.T) {
		az.Admin("POST", "/dps/enrollments/"+azsim.X509Group+"/disable", nil, nil)
		defer az.Admin("POST", "/dps/enrollments/"+azsim.X509Group+"/enable", nil, nil)
		c, _ := connect(t, az, "dev-d1", certAPI, onboarding(t, az, "dev-d1"), "")
		if r := c.register(map[string]any{}); r.status != 200 || r.body["status"] != "disabled" {
			t.Fatalf("got %d %v", r.status, r.body)
		}
	})
	t.Run("ok/throttling fault: 429 with retry-after", func(t *testing.T) {
		az.Admin("POST", "/faults", map[string]any{"target": "dps", "status": 429, "retryAfter": 7, "count": 1}, nil)
		c, _ := connect(t, az, "dev-t1", certAPI, onboarding(t, az, "dev-t1"), "")
		r := c.request("$dps/registrations/PUT/iotdps-register/?$rid=9", map[string]any{})
		if r.status != 429 || r.query.Get("retry-after") != "7" || r.query.Get("$rid") != "9" {
			t.Fatalf("got %d %v", r.status, r.query)
		}
	})
	t.Run("fail/wrong id scope is refused at CONNECT", func(t *testing.T) {
		az2 := *az
		az2.Info.IDScope = "0ne00WRONG0"
		if _, err := connect(t, &az2, "dev-w1", certAPI, onboarding(t, az, "dev-w1"), ""); err == nil {
			t.Fatal("connected with an unknown id scope")
		}
	})
	t.Run("ok/registrations persist across a restart", func(t *testing.T) {
		d, err := dps.New(dps.Config{TLS: &tls.Config{}, Registrar: az.Server.Hub, Issuer: az.Server.PKI, StateDir: az.Dir + "/state/dps"})
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, r := range d.Registrations() {
			found = found || r.RegistrationID == "dev-x1"
		}
		if !found || len(d.Enrollments()) != 2 {
			t.Fatalf("after reload: %d enrollments, dev-x1 registered %v", len(d.Enrollments()), found)
		}
	})
}

func big1() *big.Int { return big.NewInt(time.Now().UnixNano()) }

// TestDPSTLS: the handshake as Azure DPS does it: TLS 1.2 only, an RSA-2048
// server chain by default (ECDSA as an option), and a CertificateRequest
// whose certificate_authorities list names none of the device's CAs.
func TestDPSTLS(t *testing.T) {
	for _, key := range []string{"rsa", "ecdsa"} {
		t.Run("ok/"+key, func(t *testing.T) {
			az := azsimtest.Start(t, azsim.Config{ServerKey: key})
			pool := x509.NewCertPool()
			b, _ := os.ReadFile(az.Info.TrustBundle)
			pool.AppendCertsFromPEM(b)
			var req *tls.CertificateRequestInfo
			cert := onboarding(t, az, "dev-tls")
			tc := &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12,
				GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) { req = cri; return cert, nil }}
			conn, err := tls.Dial("tcp", az.Info.DPSAddr, tc)
			if err != nil {
				t.Fatal(err)
			}
			st := conn.ConnectionState()
			conn.Close()
			if st.Version != tls.VersionTLS12 {
				t.Errorf("negotiated %s, want TLS 1.2 only", tls.VersionName(st.Version))
			}
			if len(st.PeerCertificates) != 2 {
				t.Errorf("server sent %d certificates, want leaf and intermediate", len(st.PeerCertificates))
			}
			wantAlgo := map[string]x509.PublicKeyAlgorithm{"rsa": x509.RSA, "ecdsa": x509.ECDSA}[key]
			if st.PeerCertificates[0].PublicKeyAlgorithm != wantAlgo {
				t.Errorf("server key %v, want %v", st.PeerCertificates[0].PublicKeyAlgorithm, wantAlgo)
			}
			if k, ok := st.PeerCertificates[0].PublicKey.(*rsa.PublicKey); ok && k.N.BitLen() != 2048 {
				t.Errorf("RSA server key of %d bits, want 2048", k.N.BitLen())
			}
			if req == nil || len(req.AcceptableCAs) == 0 {
				t.Fatal("the CertificateRequest carried no certificate_authorities list")
			}
			leafIssuer := onboardingIssuer(t, cert)
			for _, ca := range req.AcceptableCAs {
				if string(ca) == string(leafIssuer) {
					t.Fatal("the CA list names the device's factory CA; it must name none of the device's CAs")
				}
			}
			// A client with a static certificate list sends nothing and
			// is refused; one that always presents its chain registers.
			static := &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{*cert}}
			c, err := dial(t, az, "dev-tls", dps.MinCertAPIVersion, static, "")
			if err != nil {
				t.Fatal(err)
			}
			if r := c.request("$dps/registrations/PUT/iotdps-register/?$rid=1", map[string]any{"registrationId": "dev-tls"}); r.status != 401 {
				t.Fatalf("static certificate list: %d, want 401 (no certificate sent)", r.status)
			}
			c2, err := connect(t, az, "dev-tls", dps.MinCertAPIVersion, cert, "")
			if err != nil {
				t.Fatal(err)
			}
			if r := c2.register(map[string]any{"registrationId": "dev-tls"}); r.status != 200 {
				t.Fatalf("register: %d %v", r.status, r.body)
			}
		})
	}
}

func onboardingIssuer(t *testing.T, c *tls.Certificate) []byte {
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return leaf.RawIssuer
}

// TestPollThrottling: DPS allows 5 operation-status polls per 10 s per
// registration and answers 429 with retry-after beyond that.
func TestPollThrottling(t *testing.T) {
	frozen := time.Now()
	az := azsimtest.Start(t, azsim.Config{Now: func() time.Time { return frozen }})
	az.Server.Faults.SetAssignDelay(time.Hour) // stays "assigning": every poll is a 202
	c, err := connect(t, az, "dev-poll", dps.MinCertAPIVersion, onboarding(t, az, "dev-poll"), "")
	if err != nil {
		t.Fatal(err)
	}
	r := c.request("$dps/registrations/PUT/iotdps-register/?$rid=1", map[string]any{"registrationId": "dev-poll"})
	if r.status != 202 {
		t.Fatalf("register: %d", r.status)
	}
	op := r.body["operationId"].(string)
	var got []int
	for i := range 6 {
		p := c.request(fmt.Sprintf("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=%d&operationId=%s", i+2, op), nil)
		got = append(got, p.status)
		if p.status == 429 {
			if ra, _ := strconv.Atoi(p.query.Get("retry-after")); ra < 1 || ra > 10 {
				t.Fatalf("429 with retry-after %q, want 1..10 s", p.query.Get("retry-after"))
			}
		}
	}
	if want := []int{202, 202, 202, 202, 202, 429}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("poll statuses %v, want %v", got, want)
	}
}

// TestIndividualEnrollment: an individual enrollment takes precedence over
// the groups and may set a device id other than the registration id; the
// issued certificate keeps the registration id as CN, and the hub accepts
// the device under its device id with it.
func TestIndividualEnrollment(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	root, err := os.ReadFile(az.Info.OnboardingRoot)
	if err != nil {
		t.Fatal(err)
	}
	if st := az.Admin("PUT", "/dps/enrollments/dev-ind", map[string]any{"kind": "x509", "enabled": true, "individual": true,
		"deviceId": "gateway-7", "ca": string(root)}, nil); st >= 300 {
		t.Fatalf("put enrollment: %d", st)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	c, err := connect(t, az, "dev-ind", certAPI, onboarding(t, az, "dev-ind"), "")
	if err != nil {
		t.Fatal(err)
	}
	r := c.register(map[string]any{"registrationId": "dev-ind", "csr": csrFor(t, key, "dev-ind")})
	st, _ := r.body["registrationState"].(map[string]any)
	if r.status != 200 || st["deviceId"] != "gateway-7" {
		t.Fatalf("reply %d %v; want device id gateway-7", r.status, r.body)
	}
	if x, _ := st["x509"].(map[string]any); x["enrollmentGroupId"] != nil {
		t.Fatalf("an individual enrollment reported as group %v", x["enrollmentGroupId"])
	}
	var hubCert tls.Certificate
	for _, b := range st["issuedCertificateChain"].([]any) {
		der, _ := base64.StdEncoding.DecodeString(b.(string))
		hubCert.Certificate = append(hubCert.Certificate, der)
	}
	hubCert.PrivateKey = key
	leaf, _ := x509.ParseCertificate(hubCert.Certificate[0])
	if leaf.Subject.CommonName != "dev-ind" {
		t.Fatalf("issued CN %q, want the registration id", leaf.Subject.CommonName)
	}
	pool := x509.NewCertPool()
	b, _ := os.ReadFile(az.Info.TrustBundle)
	pool.AppendCertsFromPEM(b)
	host := az.Info.HubHostName
	opts := paho.NewClientOptions().AddBroker("tls://" + host).SetClientID("gateway-7").
		SetUsername(host + "/gateway-7/?api-version=2025-08-01-preview").SetProtocolVersion(4).SetAutoReconnect(false).
		SetConnectTimeout(5 * time.Second).SetTLSConfig(&tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &hubCert, nil }})
	hc := paho.NewClient(opts)
	if tok := hc.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("hub connect as gateway-7: %v", tok.Error())
	}
	hc.Disconnect(0)
}

// TestReprovisionToAnotherHub: after an operator moves a device, its next
// registration assigns the second hub with substatus deviceDataMigrated.
func TestReprovisionToAnotherHub(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{Hub2Addr: "127.0.0.1:0"})
	key, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	cert := onboarding(t, az, "dev-move")
	reg := func() map[string]any {
		c, err := connect(t, az, "dev-move", certAPI, cert, "")
		if err != nil {
			t.Fatal(err)
		}
		r := c.register(map[string]any{"registrationId": "dev-move", "csr": csrFor(t, key, "dev-move")})
		st, _ := r.body["registrationState"].(map[string]any)
		if r.status != 200 {
			t.Fatalf("register: %d %v", r.status, r.body)
		}
		return st
	}
	if st := reg(); st["assignedHub"] != az.Info.HubHostName || st["substatus"] != "initialAssignment" {
		t.Fatalf("first registration: %v %v", st["assignedHub"], st["substatus"])
	}
	if s := az.Admin("POST", "/dps/allocate", map[string]any{"registrationId": "dev-move", "hub": "hub2"}, nil); s != 204 {
		t.Fatalf("allocate: %d", s)
	}
	st := reg()
	if st["assignedHub"] != az.Info.Hub2HostName || st["substatus"] != "deviceDataMigrated" {
		t.Fatalf("after the move: %v %v, want %s and deviceDataMigrated", st["assignedHub"], st["substatus"], az.Info.Hub2HostName)
	}
	var dev struct{ DeviceID string }
	if s := az.Admin("GET", "/hub2/devices/dev-move", nil, &dev); s != 200 || dev.DeviceID != "dev-move" {
		t.Fatalf("second hub registry: %d %q", s, dev.DeviceID)
	}
}
