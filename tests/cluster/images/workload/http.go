package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"time"
)

func runHTTPServe(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("http-serve", flag.ContinueOnError)
	listen := fs.String("listen", ":8080", "address to serve on")
	host, _ := os.Hostname()
	pod := fs.String("pod", envOr("POD_NAME", host), "this pod's name, put in every answer")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var served atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		n := served.Add(1)
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintf(w, "MSNF %s answer %d to %s for %s\n", *pod, n, r.RemoteAddr, r.URL.RequestURI())
	})
	srv := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	logf("http-serve: on %s", ln.Addr())
	stop := reportEvery(ctx, 10*time.Second, func() { logf("http-serve: %d served", served.Load()) })
	defer stop()
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		srv.Shutdown(shutdown)
	}()
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return ctx.Err()
}

func runHTTP(ctx context.Context, args []string) error {
	var c common
	fs := flag.NewFlagSet("http", flag.ContinueOnError)
	c.register(fs, 1)
	port := fs.String("port", "8080", "HTTP port of -selector targets")
	path := fs.String("path", "/", "path to GET")
	rawURL := fs.String("url", "", "a full URL to GET instead of targets")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var ts *targetSet
	if *rawURL != "" {
		ts = &targetSet{}
		ts.set([]string{*rawURL})
	} else {
		var err error
		ts, err = resolveTargets(ctx, &c, func(ip string) string { return joinHostPort(ip, *port) })
		if err != nil {
			return err
		}
	}
	client := &http.Client{
		Timeout:   c.timeout,
		Transport: &http.Transport{Proxy: nil, DisableKeepAlives: false, MaxIdleConnsPerHost: 4},
	}
	var sent, ok, failed atomic.Int64
	stopReports := reportEvery(ctx, c.report, func() {
		logf("http: %d sent, %d ok, %d failed; targets %s", sent.Load(), ok.Load(), failed.Load(), ts)
	})
	defer stopReports()
	err := pacer(ctx, c.rate, c.count, func(seq int) {
		target, werr := waitForTarget(ctx, ts)
		if werr != nil {
			return
		}
		u := target
		if *rawURL == "" {
			u = "http://" + target + *path
		}
		sent.Add(1)
		req, rerr := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if rerr != nil {
			failed.Add(1)
			logf("http: %s: %v", u, rerr)
			return
		}
		req.Header.Set("X-Msnf", marker(c.pod, seq))
		resp, rerr := client.Do(req)
		if rerr != nil {
			failed.Add(1)
			logf("http: %s: %v", u, rerr)
			return
		}
		io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			failed.Add(1)
			logf("http: %s: %s", u, resp.Status)
			return
		}
		ok.Add(1)
	})
	logf("http: %d sent, %d ok, %d failed; targets %s (done)", sent.Load(), ok.Load(), failed.Load(), ts)
	if err != nil {
		return err
	}
	if c.count > 0 && ok.Load() != int64(c.count) {
		return &shortfall{fmt.Sprintf("%d of %d requests succeeded", ok.Load(), c.count)}
	}
	return nil
}
