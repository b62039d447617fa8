package keystoretest

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/tlsconf"
)

// tls12ClientAuth authenticates with s as a TLS 1.2 client, as gwagent does
// towards Azure DPS (TLS 1.2 only), through gwagent's own TLS configuration:
//
//   - against crypto/tls, which lets the client pick (ECDSA P-384, SHA-384);
//   - against OpenSSL asking for ecdsa_secp256r1_sha256 only: in TLS 1.2
//     that scheme is not bound to a curve, so the P-384 key must sign a
//     SHA-256 digest, which TPMs and tokens must support.
//
// Each server checks the CertificateVerify signature, so a handshake that
// completes proves the key signed correctly.
func tls12ClientAuth(t *testing.T, s crypto.Signer) {
	dir := t.TempDir()
	leaf := selfSigned(t, s, "device", false)
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	srv := selfSigned(t, srvKey, "localhost", true)
	roots := x509.NewCertPool()
	roots.AddCert(srv)

	t.Run("crypto-tls", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		got := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				got <- err
				return
			}
			defer c.Close()
			tc := tls.Server(c, &tls.Config{MaxVersion: tls.VersionTLS12, ClientAuth: tls.RequireAnyClientCert,
				Certificates: []tls.Certificate{{Certificate: [][]byte{srv.Raw}, PrivateKey: srvKey}}})
			got <- tc.Handshake()
		}()
		if !handshake(t, ln.Addr().String(), roots, s, leaf) {
			t.FailNow()
		}
		if err := <-got; err != nil {
			t.Fatalf("server side: %v", err)
		}
	})
	t.Run("openssl-asks-ecdsa_secp256r1_sha256", func(t *testing.T) {
		bin := testenv.LookPath(t, "openssl", "openssl")
		write := func(name, typ string, der []byte) string {
			p := filepath.Join(dir, name)
			if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
				t.Fatal(err)
			}
			return p
		}
		kder, _ := x509.MarshalPKCS8PrivateKey(srvKey)
		cmd := exec.Command(bin, "s_server", "-accept", "127.0.0.1:0", "-tls1_2", "-naccept", "1",
			"-cert", write("srv.crt", "CERTIFICATE", srv.Raw), "-key", write("srv.key", "PRIVATE KEY", kder),
			"-Verify", "1", "-verify_return_error", "-CAfile", write("client.crt", "CERTIFICATE", leaf.Raw),
			"-client_sigalgs", "ecdsa_secp256r1_sha256", "-sigalgs", "ecdsa_secp256r1_sha256")
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = cmd.Stdout
		// s_server ends at EOF on stdin: keep it open.
		if _, err := cmd.StdinPipe(); err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		sc := bufio.NewScanner(out)
		addr := ""
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "ACCEPT "); ok {
				addr = a
				break
			}
		}
		if addr == "" {
			t.Fatal("openssl s_server did not say where it listens")
		}
		var log strings.Builder
		done := make(chan struct{})
		go func() {
			defer close(done)
			for sc.Scan() {
				log.WriteString(sc.Text() + "\n")
			}
		}()
		if !handshake(t, addr, roots, s, leaf) {
			cmd.Process.Kill()
			<-done
			t.Fatalf("openssl s_server said:\n%s", log.String())
		}
	})
}

func handshake(t *testing.T, addr string, roots *x509.CertPool, s crypto.Signer, leaf *x509.Certificate) bool {
	t.Helper()
	cfg, err := tlsconf.Client("localhost", roots, s, []*x509.Certificate{leaf})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d := tls.Dialer{Config: cfg}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Errorf("TLS 1.2 handshake with the key: %v", err)
		return false
	}
	defer c.Close()
	tc := c.(*tls.Conn)
	// TLS 1.2 sends the client's CertificateVerify before the server's
	// Finished: a completed handshake means the server accepted it.
	if v := tc.ConnectionState().Version; v != tls.VersionTLS12 {
		t.Errorf("negotiated %s, want TLS 1.2", tls.VersionName(v))
		return false
	}
	return true
}

func selfSigned(t *testing.T, s crypto.Signer, cn string, server bool) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, BasicConstraintsValid: true}
	if server {
		tmpl.ExtKeyUsage, tmpl.DNSNames = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, []string{"localhost"}
	} else {
		// OpenSSL takes the self-signed device certificate as its own CA.
		tmpl.IsCA, tmpl.KeyUsage = true, tmpl.KeyUsage|x509.KeyUsageCertSign
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, s.Public(), s)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}
