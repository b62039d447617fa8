package tlsconf

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"testing"
	"time"
)

type pair struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func issue(t *testing.T, cn string, parent *pair, curve elliptic.Curve, ca bool, eku ...x509.ExtKeyUsage) pair {
	t.Helper()
	key, err := ecdsa.GenerateKey(curve, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: eku, DNSNames: []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		BasicConstraintsValid: true, IsCA: ca,
	}
	if ca {
		tmpl.KeyUsage |= x509.KeyUsageCertSign
	}
	signer, issuer := crypto.Signer(key), tmpl
	if parent != nil {
		signer, issuer = parent.key, parent.cert
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, key.Public(), signer)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return pair{c, key}
}

// server is a real TLS 1.2 server that asks for a client certificate with
// caList in certificate_authorities and hands the outcome to got.
func server(t *testing.T, srv pair, caList *x509.CertPool, verify func([][]byte) error) (addr string, got chan []*x509.Certificate) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got = make(chan []*x509.Certificate, 1)
	conf := &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{srv.cert.Raw}, PrivateKey: srv.key}},
		ClientAuth:   tls.RequestClientCert, ClientCAs: caList, MaxVersion: tls.VersionTLS12,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if verify != nil {
				return verify(raw)
			}
			return nil
		},
	}
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		tc := tls.Server(c, conf)
		if tc.Handshake() != nil {
			got <- nil
			return
		}
		got <- tc.ConnectionState().PeerCertificates
		tc.Write([]byte("x"))
	}()
	return ln.Addr().String(), got
}

func TestClientAlwaysPresentsChain(t *testing.T) {
	serverRoot := issue(t, "Server Root", nil, elliptic.P256(), true)
	srv := issue(t, "localhost", &serverRoot, elliptic.P256(), false, x509.ExtKeyUsageServerAuth)
	devRoot := issue(t, "Device Root", nil, elliptic.P384(), true)
	devInter := issue(t, "Device Intermediate", &devRoot, elliptic.P384(), true)
	leaf := issue(t, "dev1", &devInter, elliptic.P384(), false, x509.ExtKeyUsageClientAuth)
	unrelated := issue(t, "Some Other CA", nil, elliptic.P256(), true)
	roots := x509.NewCertPool()
	roots.AddCert(serverRoot.cert)

	for name, caList := range map[string]*x509.CertPool{
		"ok/empty-ca-list":               nil,
		"ok/ca-list-without-device-root": func() *x509.CertPool { p := x509.NewCertPool(); p.AddCert(unrelated.cert); return p }(),
	} {
		t.Run(name, func(t *testing.T) {
			addr, got := server(t, srv, caList, nil)
			cfg, err := Client(addr, roots, leaf.key, []*x509.Certificate{leaf.cert, devInter.cert})
			if err != nil {
				t.Fatal(err)
			}
			c, err := tls.Dial("tcp", addr, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			peer := <-got
			if len(peer) != 2 || !peer[0].Equal(leaf.cert) || !peer[1].Equal(devInter.cert) {
				t.Fatalf("server received %d certificates, want the device's leaf and intermediate", len(peer))
			}
		})
	}
}

func TestRejectedIdentity(t *testing.T) {
	serverRoot := issue(t, "Server Root", nil, elliptic.P256(), true)
	srv := issue(t, "localhost", &serverRoot, elliptic.P256(), false, x509.ExtKeyUsageServerAuth)
	leaf := issue(t, "dev1", nil, elliptic.P384(), false, x509.ExtKeyUsageClientAuth)
	roots := x509.NewCertPool()
	roots.AddCert(serverRoot.cert)

	addr, _ := server(t, srv, nil, func([][]byte) error { return errors.New("not a device we know") })
	cfg, err := Client(addr, roots, leaf.key, []*x509.Certificate{leaf.cert})
	if err != nil {
		t.Fatal(err)
	}
	_, err = tls.Dial("tcp", addr, cfg)
	if err == nil {
		t.Fatal("handshake succeeded; the server should have refused the certificate")
	}
	if !RejectedIdentity(err) {
		t.Fatalf("RejectedIdentity(%v) = false, want true", err)
	}
	if RejectedIdentity(&net.OpError{Op: "dial", Err: errors.New("connection refused")}) {
		t.Fatal("a refused TCP connection counts as a rejection of the identity")
	}
	if RejectedIdentity(nil) {
		t.Fatal("nil counts as a rejection")
	}
	// The server's certificate failing our check is not the server refusing us.
	addr2, _ := server(t, srv, nil, nil)
	cfg2, _ := Client(addr2, x509.NewCertPool(), leaf.key, []*x509.Certificate{leaf.cert})
	if _, err := tls.Dial("tcp", addr2, cfg2); err == nil || RejectedIdentity(err) {
		t.Fatalf("untrusted server: err = %v, RejectedIdentity true or no error", err)
	}
}
