{{/* Names and labels, as in Triton's deploy/k8s-onprem chart. */}}
{{- define "triffusion.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "triffusion.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "triffusion.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "triffusion.selectorLabels" -}}
app.kubernetes.io/name: {{ include "triffusion.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "triffusion.labels" -}}
{{ include "triffusion.selectorLabels" . }}
helm.sh/chart: {{ include "triffusion.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "triffusion.claimName" -}}
{{- default (printf "%s-models" (include "triffusion.fullname" .)) .Values.modelStore.existingClaim -}}
{{- end -}}

{{/* The export's flags (its image's entrypoint is `python3 -m triffusion.export build`). */}}
{{- define "triffusion.exportArgs" -}}
{{- if .Values.model.family }}
- --registry
- /etc/triffusion/registry.yaml
- --family
- {{ .Values.model.family | quote }}
{{- else }}
- --model
- {{ required "model.id (or model.family with model.registry) is required" .Values.model.id | quote }}
{{- end }}
- --target
- {{ .Values.model.target | quote }}
{{- with .Values.model.sizes }}
- --sizes
- {{ join "," . | quote }}
{{- end }}
{{- range .Values.model.exportArgs }}
- {{ . | quote }}
{{- end }}
- --out
- /models/repository
{{- end -}}

{{/* Identifies one export configuration: a change makes a new export Job and a new done-marker. */}}
{{- define "triffusion.exportHash" -}}
{{- printf "%s\n%s\n%s" (include "triffusion.exportArgs" .) .Values.model.registry .Values.image.export | sha256sum | trunc 10 -}}
{{- end -}}

{{/* The export container, for the Job and for the init container. */}}
{{- define "triffusion.exportContainer" -}}
- name: export
  image: {{ .Values.image.export | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  # The export skips work its manifest says is done; flock serialises pods sharing one volume. The
  # marker tells serving pods that this configuration is exported.
  command:
    - bash
    - -c
    - >-
      set -euo pipefail;
      flock /models/.export.lock python3 -m triffusion.export build "$@";
      touch /models/export-{{ include "triffusion.exportHash" . }}.done
    - export
  args:
    {{- include "triffusion.exportArgs" . | trim | nindent 4 }}
  env:
    - name: HF_HOME
      value: /models/.cache/huggingface
    {{- with .Values.model.hfTokenSecret }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ .name }}
          key: {{ .key }}
    {{- end }}
  resources:
    {{- $limits := merge (dict "nvidia.com/gpu" .Values.export.gpus) (deepCopy (.Values.export.resources.limits | default dict)) }}
    {{- with .Values.export.resources.requests }}
    requests:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    limits:
      {{- toYaml $limits | nindent 6 }}
  volumeMounts:
    - name: models
      mountPath: /models
    {{- if .Values.model.family }}
    - name: registry
      mountPath: /etc/triffusion
      readOnly: true
    {{- end }}
    {{- if .Values.model.checkpointsClaim }}
    - name: checkpoints
      mountPath: /checkpoints
      readOnly: true
    {{- end }}
{{- end -}}

{{/* Volumes the export needs beside the model store. */}}
{{- define "triffusion.exportVolumes" -}}
{{- if .Values.model.family }}
- name: registry
  configMap:
    name: {{ include "triffusion.fullname" . }}-registry
{{- end }}
{{- if .Values.model.checkpointsClaim }}
- name: checkpoints
  persistentVolumeClaim:
    claimName: {{ .Values.model.checkpointsClaim }}
    readOnly: true
{{- end }}
{{- end -}}

{{- define "triffusion.modelsVolume" -}}
- name: models
{{- if .Values.modelStore.persistence }}
  persistentVolumeClaim:
    claimName: {{ include "triffusion.claimName" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}
